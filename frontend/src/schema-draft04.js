// The spec's JSON Schema comes from pydantic (draft 2020-12); the editor's validator (json-schema-library,
// as used by codemirror-json-schema) implements draft 4. Rewrite the two constructs that differ, so the
// editor enforces every bound the server does: numeric exclusiveMinimum/Maximum become draft 4's boolean
// form, and prefixItems (tuples such as betas) becomes the array form of items.

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
  if (Array.isArray(out.prefixItems)) {
    out.items = out.prefixItems;
    delete out.prefixItems;
  }
  return out;
}
