"""The configure pages: the list, one config (versions, diff, estimate), the wizard, the JSON editor, comparison.

Server-rendered; htmx swaps the wizard's steps and estimate panels in place (every endpoint also answers a
plain form post with a whole page). Every config lookup goes through ``visible_configs``: someone else's
config is a 404. The JSON editor saves through the API (``builder.configs.api``), which validates again with
the same schema.
"""

from __future__ import annotations

import json
from typing import Any, cast

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.configs.forms import (
    HIGHLIGHTED_REASONS,
    STEPS,
    TWEAKS,
    SaveForm,
    WizardForm,
    apply_tweaks,
    read_tweaks,
)
from builder.configs.models import Config, VersionSource
from builder.configs.presets import PRESETS
from builder.configs.services import (
    EstimateRequest,
    advice_for_raw,
    calibration_factor,
    create_config,
    estimate_with_advice,
    parse_spec,
    stored_spec,
    visible_configs,
)
from builder.configs.specdiff import align, diff_specs, flatten
from builder.configs.wizard import DATA_SIZES, propose
from builder.core.errors import Refusal
from builder.core.parsers import load_json
from builder.core.profiles import hardware_profile, hardware_profiles
from workers.engine.estimate import Parallelism, estimate_time
from workers.engine.hardware import PROFILES, HardwareProfile
from workers.engine.spec import Spec, json_schema

MAX_COMPARED = 4


def _is_htmx(request: HttpRequest) -> bool:
    return request.headers.get("HX-Request") == "true"


def _hardware_choice(request: HttpRequest, default: str = "cpu") -> tuple[str, int | None, list[str]]:
    """``hw`` and ``gpus`` from the query or form, checked; errors name the parameter. ``gpus`` None (absent or
    blank): each configuration on the devices its ``training.distributed`` asks for, what its job would run on."""
    params = request.POST if request.method == "POST" else request.GET
    errors: list[str] = []
    key = params.get("hw", default)
    if key not in PROFILES:
        errors.append(f"hw: choose one of {', '.join(PROFILES)}")
        key = default
    raw = params.get("gpus", "").strip()
    if not raw:
        return key, None, errors
    gpus = int(raw) if raw.isdigit() else 0
    if not 1 <= gpus <= PROFILES[key].max_devices:
        errors.append(f"gpus: between 1 and {PROFILES[key].max_devices} for {PROFILES[key].name}")
        gpus = 1
    return key, gpus, errors


def _launch_url(version_id: int | None) -> str | None:
    """The job launch form for a saved version (None for a spec that is not saved: jobs launch saved versions)."""
    if version_id is None:
        return None
    return f"{reverse('jobs:launch')}?config_version={version_id}"


def _parallelism(request: HttpRequest) -> str | None:
    """``par``: ``ddp`` (every GPU holds every expert), ``expert`` (experts sharded) or ``fsdp`` (parameters,
    gradients and optimizer state sharded); None (absent): the layout each configuration's spec asks for."""
    params = request.POST if request.method == "POST" else request.GET
    chosen = params.get("par")
    return chosen if chosen in ("ddp", "expert", "fsdp") else None


def _estimate_context(
    spec: Any,
    profile: HardwareProfile,
    gpus: int | None,
    dataset_tokens: int | None = None,
    parallelism: str | None = None,
) -> dict[str, Any]:
    """The estimate panel's context on ``profile`` (resolved once by the view: ``builder.core.profiles``)."""
    note = ""
    if gpus is None and spec.training.distributed.devices > profile.max_devices:
        # What the job asks for cannot run here: say so, and show the most this hardware holds.
        note = (
            f"training.distributed.devices: this configuration asks for {spec.training.distributed.devices} "
            f"devices; {profile.name} has at most {profile.max_devices}, so it is estimated on {profile.max_devices}."
        )
        gpus = profile.max_devices
    result = estimate_with_advice(spec, EstimateRequest(profile, gpus, parallelism, dataset_tokens))
    est = result["estimate"]
    # The bar's full width: the device's memory, or the peak when it does not fit.
    scale = max(est["memory"]["peak"], est["memory"]["capacity"])
    return {"est": est, "warnings": result["warnings"], "hw": profile, "scale": scale, "layout_note": note}


def _shown(value: Any) -> Any:
    """A value as the comparison shows it (a share to whole per cent), so equal-looking cells are not marked."""
    return round(value, 2) if isinstance(value, float) else value


def architecture_costs(spec: Spec, est: dict[str, Any], profile: HardwareProfile) -> dict[str, Any]:
    """What the DeepSeek-V3 choices cost, for the comparison: the attention and its KV cache per token next to
    multi-head attention's with the same heads (fp32, all layers), multi-token prediction's parameters and
    extra step time (the estimate without the MTP modules), and the optimizer with the state it holds."""
    m, o = spec.model, spec.training.optimizer
    attention = {"mha": "multi-head", "gqa": f"grouped-query ({m.kv_heads} KV heads)", "mla": "latent (MLA)"}
    mha_kv = 2 * m.num_layers * m.num_heads * m.head_dim * 4
    mtp_extra = None
    if m.mtp_depth:
        raw = spec.model_dump(mode="json")
        raw["model"]["mtp_depth"] = 0
        without = estimate_time(
            parse_spec(raw),
            profile,
            num_gpus=est["num_gpus"],  # the devices the estimate used (the spec's, or those asked for)
            parallelism=cast(Parallelism, est["parallelism"]),
            calibration=est["time"]["calibration_factor"],
        )
        mtp_extra = est["time"]["step_seconds"] / without.step_seconds - 1
    return {
        "attention": attention[m.attention]
        + (f", latent {m.mla.kv_lora_rank} + rotary {m.mla.qk_rope_head_dim}" if m.attention == "mla" else ""),
        "kv_bytes_per_token": est["kv_cache"]["bytes_per_token"],
        "kv_bytes_per_token_mha": mha_kv,
        "kv_smaller": round(mha_kv / est["kv_cache"]["bytes_per_token"], 1),
        "kv_bytes_per_sequence": est["kv_cache"]["bytes_per_sequence"],
        "mtp_depth": m.mtp_depth,
        "mtp_loss_weight": spec.training.mtp_loss_weight,
        "mtp_parameters": est["parameters"].get("mtp", 0),
        "mtp_step_extra": mtp_extra,
        "optimizer": o.name,
        "optimizer_state_bytes": est["memory"]["optimizer"],
    }


# Rows of the comparison's architecture block: (row, the keys of architecture_costs it shows).
ARCHITECTURE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("attention",)),
    ("kv_cache", ("kv_bytes_per_token",)),
    ("mtp", ("mtp_depth", "mtp_step_extra")),
    ("optimizer", ("optimizer",)),
    ("optimizer_state", ("optimizer_state_bytes",)),
)


@login_required
@require_GET
def index(request: HttpRequest) -> HttpResponse:
    configs = list(visible_configs(request.user).prefetch_related("versions")[:200])
    rows = [{"config": c, "latest": c.latest, "count": c.versions.count()} for c in configs]
    return render(request, "configs/index.html", {"rows": rows, "presets": PRESETS.values()})


@login_required
@require_GET
def detail(request: HttpRequest, config_id: int) -> HttpResponse:
    config = get_object_or_404(visible_configs(request.user), pk=config_id)
    versions = list(config.versions.order_by("-number"))
    latest = versions[0]
    hw, gpus, errors = _hardware_choice(request)
    diff = None
    a, b = request.GET.get("a", ""), request.GET.get("b", "")
    if a or b:
        by_number = {str(v.number): v for v in versions}
        if a not in by_number:
            errors.append(f"a: {config.name} has no version {a!r}")
        if b not in by_number:
            errors.append(f"b: {config.name} has no version {b!r}")
        if a in by_number and b in by_number:
            diff = {"a": a, "b": b, "changes": diff_specs(by_number[a].spec, by_number[b].spec)}
    # The diff picker shows the pair asked for, else the newest version against the one before it.
    sel_a = int(a) if diff else versions[min(1, len(versions) - 1)].number
    sel_b = int(b) if diff else latest.number
    profiles = hardware_profiles()
    context = {
        "config": config,
        "versions": versions,
        "latest": latest,
        "diff": diff,
        "sel_a": sel_a,
        "sel_b": sel_b,
        "errors": errors,
        "profiles": profiles.values(),
        "hw_key": hw,
        "gpus": gpus,
        "spec_json": json.dumps(latest.spec, indent=2),
        "launch_url": _launch_url(latest.pk),
        "par": _parallelism(request),
        **_estimate_context(parse_spec(latest.spec), profiles[hw], gpus, parallelism=_parallelism(request)),
    }
    return render(request, "configs/detail.html", context, status=400 if errors else 200)


@login_required
@require_POST
def delete(request: HttpRequest, config_id: int) -> HttpResponse:
    config = get_object_or_404(visible_configs(request.user), pk=config_id)
    target = audit.Target.of(config)
    config.delete()
    audit.record(request, AuditAction.DELETION, target)
    return redirect("configs:index")


# -- wizard ------------------------------------------------------------------------------------------------


def _proposal_context(form: WizardForm, data: Any) -> dict[str, Any]:
    """The proposal for the form's answers with the tweaks in ``data`` applied, validated and estimated."""
    answers = form.answers()
    calibration = calibration_factor(answers.hardware_profile)
    proposal = propose(answers, calibration=calibration)
    values, tweak_errors = read_tweaks(data)
    raw = apply_tweaks(stored_spec(proposal.spec), values)
    field_errors: dict[str, str] = dict(tweak_errors)
    context: dict[str, Any] = {"proposal": proposal, "answers": answers}
    try:
        spec = parse_spec(raw)
    except Refusal as exc:
        for error in exc.errors:
            field_errors.setdefault(error.path, error.message)
        spec = None
        context["warnings"] = advice_for_raw(raw, answers.hardware_profile, answers.num_gpus)
    flat = flatten(raw)
    context["tweaks"] = [
        {
            "path": path,
            "label": label,
            "kind": kind if isinstance(kind, str) else "choice",
            "choices": kind if isinstance(kind, tuple) else (),
            "value": flat.get(path),
            "proposed": flatten(stored_spec(proposal.spec)).get(path),
            "reason": proposal.reasons.get(path, ""),
            "error": field_errors.get(path, ""),
        }
        for path, label, kind in TWEAKS
    ]
    shown = {path for path, _, _ in TWEAKS}
    context["highlighted_reasons"] = [
        (p, flat.get(p), proposal.reasons[p]) for p in HIGHLIGHTED_REASONS if p in proposal.reasons
    ]
    shown |= set(HIGHLIGHTED_REASONS)
    context["other_reasons"] = [(p, flat.get(p), r) for p, r in proposal.reasons.items() if p not in shown]
    context["data_label"] = DATA_SIZES[answers.data_size].label
    context["field_errors"] = [(p, m) for p, m in field_errors.items() if p not in shown]
    context["spec_valid"] = spec is not None
    context["spec"] = spec
    if spec is not None:
        context.update(_estimate_context(spec, answers.hardware_profile, answers.num_gpus, answers.dataset_tokens))
    context["spec_json"] = json.dumps(raw)
    return context


@login_required
@require_http_methods(["GET", "POST"])
def wizard(request: HttpRequest) -> HttpResponse:
    """One URL for every step: a POST carries the answers so far and ``step``, the step on screen. Next
    validates the answers up to that step and shows the following one (the proposal after the last);
    ``back`` shows the previous step without validating."""
    last = len(STEPS) + 1  # the proposal
    step = 1
    if request.method == "POST":
        raw_step = request.POST.get("step", "1")
        shown = int(raw_step) if raw_step.isdigit() and 1 <= int(raw_step) <= last else 1
        if request.POST.get("back"):
            step = max(1, shown - 1)
            form = WizardForm(request.POST, step=step - 1)
            form.is_valid()  # keeps the values; nothing on this step is judged yet
            form.errors.clear()
        else:
            answered = min(shown, len(STEPS))
            form = WizardForm(request.POST, step=answered)
            step = answered + 1 if form.is_valid() else answered
    else:
        form = WizardForm(step=0)
    context: dict[str, Any] = {"form": form, "step": step, "steps": STEPS, "total": len(STEPS) + 1}
    status = 200
    if request.method == "POST" and form.errors:
        status = 400
    if step > len(STEPS):
        context.update(_proposal_context(form, {}))
        context["save_form"] = SaveForm(initial={"name": _default_name(request, form)})
    template = "configs/_wizard_step.html" if _is_htmx(request) else "configs/wizard.html"
    return render(request, template, context, status=status)


def _default_name(request: HttpRequest, form: WizardForm) -> str:
    a = form.answers()
    base = f"{a.task} · {a.data_size} data · {a.hardware_profile.name} · {a.priority}"
    name, n = base, 2
    while visible_configs(request.user).filter(name=name).exists():
        name, n = f"{base} ({n})", n + 1
    return name[:200]


@login_required
@require_POST
def wizard_estimate(request: HttpRequest) -> HttpResponse:
    """The proposal's estimate and errors for the tweaked values (the htmx target of the tweak inputs)."""
    form = WizardForm(request.POST)
    if not form.is_valid():
        return render(request, "configs/_wizard_errors.html", {"form": form}, status=400)
    return render(request, "configs/_proposal_estimate.html", _proposal_context(form, request.POST))


@login_required
@require_POST
def wizard_save(request: HttpRequest) -> HttpResponse:
    form = WizardForm(request.POST)
    if not form.is_valid():
        return render(request, "configs/wizard.html", {"form": form, "step": 1, "steps": STEPS}, status=400)
    save_form = SaveForm(request.POST)
    context = _proposal_context(form, request.POST)
    if save_form.is_valid() and context["spec_valid"]:
        try:
            config = create_config(
                request.user,
                save_form.cleaned_data["name"],
                save_form.cleaned_data["description"],
                context["spec"],
                source=VersionSource.WIZARD,
                note="proposed by the wizard",
            )
        except Refusal:  # the one refusal of create_config: the name is taken
            save_form.add_error("name", "you already have a config with this name")
        else:
            # "Save and let the platform tune the learning rate": the sweeps app's page of that small sweep (named
            # by its URL: this app never imports the apps above it).
            then = "sweeps:tune_lr" if request.POST.get("then") == "tune_lr" else "configs:detail"
            if _is_htmx(request):
                response = HttpResponse(status=204)
                response["HX-Redirect"] = reverse(then, args=[config.pk])
                return response
            return redirect(then, config.pk)
    context.update({"form": form, "step": len(STEPS) + 1, "steps": STEPS, "total": len(STEPS) + 1})
    context["save_form"] = save_form
    template = "configs/_wizard_step.html" if _is_htmx(request) else "configs/wizard.html"
    return render(request, template, context, status=400)


# -- JSON editor ---------------------------------------------------------------------------------------------


@login_required
@require_GET
def editor(request: HttpRequest, config_id: int | None = None) -> HttpResponse:
    """New (``?template=<name>`` starts from a template) or a new version of ``config_id``."""
    config: Config | None = None
    if config_id is not None:
        config = get_object_or_404(visible_configs(request.user), pk=config_id)
        spec = config.latest.spec
    else:
        name = request.GET.get("template", "tiny-cpu-demo")
        if name not in PRESETS:
            raise Http404("no such template")
        spec = PRESETS[name].as_dict()["spec"]
    boot = {
        "schema": json_schema(),
        "spec": spec,
        "templates": {name: p.as_dict()["spec"] for name, p in PRESETS.items()},
        "config": None if config is None else {"id": config.pk, "name": config.name, "latest": config.latest.number},
        "api": {
            "validate": reverse("api-specs-validate"),
            "create": reverse("api-configs"),
            "versions": reverse("api-config-versions", args=[config.pk]) if config else None,
            "detail": reverse("configs:detail", args=[0]).replace("/0/", "/{id}/"),
            "panel": reverse("configs:estimate_panel"),
        },
    }
    context = {
        "config": config,
        "presets": PRESETS.values(),
        "boot": boot,
        "profiles": hardware_profiles().values(),
    }
    return render(request, "configs/editor.html", context)


@login_required
@require_POST
def estimate_panel(request: HttpRequest) -> HttpResponse:
    """The estimate panel (HTML) for a JSON spec posted as ``spec`` with ``hw`` and ``gpus``."""
    hw, gpus, errors = _hardware_choice(request)
    try:
        spec = parse_spec(load_json(request.POST.get("spec", ""), "spec"))
    except Refusal as exc:
        errors.extend(f"{e.path or 'spec'}: {e.message}" for e in exc.errors)
    if errors:
        return render(request, "configs/_panel_errors.html", {"errors": errors}, status=400)
    # The editor lists the advice beside the problems, so the panel leaves it out.
    context = _estimate_context(spec, hardware_profile(hw), gpus)
    return render(request, "configs/_estimate.html", {**context, "hide_advice": True})


# -- comparison ---------------------------------------------------------------------------------------------


def _choices(request: HttpRequest) -> list[tuple[str, str]]:
    out = [(f"config:{c.pk}", f"{c.name} (v{c.latest.number})") for c in visible_configs(request.user)[:200]]
    out += [(f"template:{p.name}", f"Template: {p.title}") for p in PRESETS.values()]
    return out


def _resolve(request: HttpRequest, ref: str) -> tuple[str, dict[str, Any], int | None]:
    """(title, stored spec, version id) of ``config:<id>``, ``config:<id>@<n>`` or ``template:<name>``."""
    kind, _, rest = ref.partition(":")
    if kind == "template" and rest in PRESETS:
        return f"Template: {PRESETS[rest].title}", PRESETS[rest].as_dict()["spec"], None
    if kind == "config":
        pk, _, number = rest.partition("@")
        if pk.isdigit():
            config = visible_configs(request.user).filter(pk=int(pk)).first()
            if config is not None:
                version = config.latest if not number.isdigit() else config.versions.filter(number=int(number)).first()
                if version is not None:
                    return f"{config.name} v{version.number}", version.spec, version.pk
    raise Http404("no such configuration")  # someone else's config looks exactly like a missing one


@login_required
@require_http_methods(["GET", "POST"])
def compare(request: HttpRequest) -> HttpResponse:
    """2–4 configurations side by side: ``c`` = ``config:<id>[@<n>]`` or ``template:<name>`` (repeated), with
    ``hw``/``gpus``. A POST may carry ``inline_<i>``: the JSON of column ``i`` edited inline."""
    params = request.POST if request.method == "POST" else request.GET
    refs = [r for r in params.getlist("c") if r][:MAX_COMPARED]
    hw, gpus, errors = _hardware_choice(request)
    profiles = hardware_profiles()  # one read of the workers' rates for every column
    profile = profiles[hw]
    columns: list[dict[str, Any]] = []
    for i, ref in enumerate(refs):
        title, spec_dict, version_id = _resolve(request, ref)
        inline = params.get(f"inline_{i}", "").strip()
        edited = False
        if inline:
            try:
                candidate = load_json(inline, f"inline_{i}")
            except Refusal as exc:
                errors.append(f"{exc.field}: column {i + 1}: {exc.message}")
                candidate = None
            if candidate is not None and candidate != spec_dict:
                try:
                    spec_dict = stored_spec(parse_spec(candidate))
                    edited, version_id = True, None
                    title += " (edited)"
                except Refusal as exc:
                    errors.extend(f"inline_{i}.{e.path}: {e.message}" for e in exc.errors)
        spec = parse_spec(spec_dict)
        ctx = _estimate_context(spec, profile, gpus, parallelism=_parallelism(request))
        columns.append(
            {
                "index": i,
                "ref": ref,
                "title": title,
                "spec": spec_dict,
                "spec_json": json.dumps(spec_dict, indent=2),
                "edited": edited,
                "est": ctx["est"],
                "warnings": ctx["warnings"],
                "layout_note": ctx["layout_note"],
                "launch_url": _launch_url(version_id),
                "version_id": version_id,
                "saved": version_id is not None,
            }
        )
    if refs and len(refs) < 2:
        errors.append("c: choose at least two configurations to compare")
    for column in columns:
        column["arch"] = architecture_costs(parse_spec(column["spec"]), column["est"], profile)
    # A row is highlighted where the columns differ (the MTP row by its depth and cost, rounded as shown).
    arch_differs = {
        label: len({tuple(_shown(c["arch"][k]) for k in keys) for c in columns}) > 1
        for label, keys in ARCHITECTURE_ROWS
    }
    rows = align([c["spec"] for c in columns]) if columns else []
    scale = max([c["est"]["memory"]["peak"] for c in columns] + [profile.memory_bytes], default=1)
    context = {
        "columns": columns,
        "rows": rows,
        "arch_differs": arch_differs,
        "differing": sum(1 for r in rows if r.differs),
        "choices": _choices(request),
        "slots": [refs[i] if i < len(refs) else "" for i in range(MAX_COMPARED)],
        "profiles": profiles.values(),
        "hw": profile,
        "hw_key": hw,
        "gpus": gpus,
        "par": _parallelism(request),
        "scale": scale,
        "errors": errors,
    }
    return render(request, "configs/compare.html", context, status=400 if errors else 200)
