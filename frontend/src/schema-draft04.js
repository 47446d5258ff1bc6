// The spec's JSON Schema comes from pydantic (draft 2020-12); the editor's validator (json-schema-library,
// as used by codemirror-json-schema) implements draft 4. Rewrite the constructs that differ, so the
// editor enforces every bound the server does: numeric exclusiveMinimum/Maximum become draft 4's boolean
// form, and prefixItems (tuples such as betas) becomes the array form of items. A oneOf with an OpenAPI
// discriminator (the optimizer, chosen by its name) gets json-schema-library's oneOfProperty, so that the
// choice is made by that property alone: completion offers the chosen option's fields, and a bad value is
// reported at its own line instead of as "matches none of the options".

export function toDraft04(node) {
  if (Array.isArray(node)) return node.map(toDraft04);
  if (node === null || typeof node !== "object") return node;
  const out = {};
  for (const [key, value] of Object.entries(node)) out[key] = toDraft04(value);
  if (typeof out.exclusiveMinimum === "number") {
    out.minimum = out.exclusiveMinimum;
    out.exclusiveMinimum = true;
  }
  if (typeof out.exclusiveMaximum === "number") {
    out.maximum = out.exclusiveMaximum;
    out.exclusiveMaximum = true;
  }
  if (Array.isArray(out.oneOf) && typeof out.discriminator?.propertyName === "string") {
    out.oneOfProperty = out.discriminator.propertyName;
  }
  if (Array.isArray(out.prefixItems)) {
    out.items = out.prefixItems;
    delete out.prefixItems;
  }
  return out;
}

// json-schema-library's error for an object without its oneOfProperty. Every discriminated choice of the spec has
// a default (an optimizer without a name is AdamW), which oneOfProperty cannot express: such an object is left to
// the server's check, which follows the schema's.
export function isMissingDiscriminator(message) {
  return /^Value at `[^`]*` property: `[^`]+`$/.test(message);
}

