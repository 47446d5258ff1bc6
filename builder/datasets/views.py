"""Dataset pages: the list with the upload form, a dataset's page (status, statistics, cleaning), downloads.

The upload itself is done by the browser against the API (``frontend/src/datasets.js``: chunked, with a progress
bar); the forms here post to these views and redirect. Another user's dataset is a 404 everywhere.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.http.response import HttpResponseBase
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST
from pydantic import ValidationError as PydanticValidationError

from builder.accounts import audit
from builder.accounts.models import AuditAction
from builder.core.errors import Refusal
from builder.datasets import api, charts, services
from builder.datasets.cleaning import REMOVAL_REASONS, CleaningOptions
from builder.datasets.models import Dataset, Origin
from workers.engine.data import FORMATS


class CleanForm(forms.Form):
    """The page's cleaning form; ``CleaningOptions`` is the one validator (the API uses it too)."""

    name = forms.CharField(max_length=200, required=False, label="Name of the new version")
    unicode_form = forms.ChoiceField(
        choices=[("NFC", "NFC (canonical)"), ("NFKC", "NFKC (also compatibility characters)"), ("none", "none")],
        initial="NFC",
        label="Unicode normalisation",
    )
    normalize_whitespace = forms.BooleanField(required=False, initial=True, label="Normalise whitespace")
    lowercase = forms.BooleanField(required=False, initial=False, label="Lowercase")
    min_chars = forms.IntegerField(initial=1, label="Minimum length (characters)")
    max_chars = forms.IntegerField(
        required=False, label="Maximum length (characters)", widget=forms.NumberInput(attrs={"placeholder": "no limit"})
    )
    drop_exact_duplicates = forms.BooleanField(required=False, initial=True, label="Remove exact duplicates")
    drop_near_duplicates = forms.BooleanField(required=False, initial=True, label="Remove near duplicates (MinHash)")
    near_duplicate_threshold = forms.FloatField(initial=0.85, label="Near-duplicate similarity threshold")
    val_fraction = forms.FloatField(initial=0.1, label="Validation fraction (0: no split)")
    seed = forms.IntegerField(initial=0, label="Split seed")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        raw = {k: v for k, v in data.items() if k != "name"}
        try:
            data["options"] = CleaningOptions.model_validate(raw)
        except PydanticValidationError as exc:
            for err in exc.errors(include_url=False):
                field = str(err["loc"][0]) if err["loc"] else None
                self.add_error(field if field in self.fields else None, err["msg"])
        return data


class FieldsForm(forms.Form):
    text_field = forms.CharField(max_length=200, required=False, label="Text field / column")
    label_field = forms.CharField(max_length=200, required=False, label="Label field / column (empty: none)")


def _refusal_message(request: HttpRequest, exc: Refusal) -> None:
    messages.error(request, str(exc))  # "field: message", or the message when it names no field


@login_required
@require_GET
def dataset_list(request: HttpRequest) -> HttpResponse:
    datasets = services.visible_datasets(request.user).select_related("owner", "parent")
    builtin = [d for d in datasets if d.is_builtin]
    own = [d for d in datasets if not d.is_builtin]
    return render(
        request,
        "datasets/list.html",
        {
            "builtin": builtin,
            "own": own,
            "quota": services.quota_report(request.user),
            "max_upload_bytes": settings.DATASET_MAX_UPLOAD_BYTES,
            "formats": FORMATS,
        },
    )


def _charts(dataset: Dataset) -> dict[str, Any]:
    stats = dataset.stats or {}
    out: dict[str, Any] = {}
    histogram = stats.get("histogram") or []
    if histogram:
        bars = [(str(b["low"]) if b["low"] == b["high"] else f"{b['low']}–{b['high']}", b["count"]) for b in histogram]
        out["histogram"] = charts.bar_chart(
            bars, label="Length histogram: examples by characters per example", y_label="examples"
        )
    labels = (stats.get("labels") or {}).get("counts") or []
    if labels:
        shown = labels[:30]
        bars = [(str(item["label"]), item["count"]) for item in shown]
        out["labels"] = charts.bar_chart(bars, label="Label distribution", y_label="examples", css_class="labels")
        out["labels_hidden"] = len(labels) - len(shown)
    return out


@login_required
@require_GET
def dataset_detail(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = services.get_visible_dataset(request.user, dataset_id)
    is_owner = dataset.owner_id == request.user.pk
    versions = services.visible_datasets(request.user).filter(parent=dataset).order_by("version", "id")
    report = dataset.cleaning_report or {}
    return render(
        request,
        "datasets/detail.html",
        {
            "dataset": dataset,
            "is_owner": is_owner,
            "charts": _charts(dataset),
            "stats": dataset.stats or {},
            "report": report,
            "removed_rows": [(r, (report.get("removed") or {}).get(r, 0)) for r in REMOVAL_REASONS if report],
            "versions": versions,
            "clean_form": CleanForm(),
            "fields_form": FieldsForm(initial={"text_field": dataset.text_field, "label_field": dataset.label_field}),
            "can_change_fields": is_owner and dataset.origin == Origin.UPLOAD,
        },
    )


@login_required
@require_GET
@never_cache
def dataset_status(request: HttpRequest, dataset_id: int) -> HttpResponse:
    """The status block, polled by the page while a worker is busy. When the state the page shows (``shown``)
    has changed, htmx is told to reload the page, which then shows the statistics or the error."""
    dataset = services.get_visible_dataset(request.user, dataset_id)
    response = render(request, "datasets/_status.html", {"dataset": dataset})
    if request.GET.get("shown") != dataset.state:
        response["HX-Refresh"] = "true"
    return response


@login_required
@require_GET
def dataset_download(request: HttpRequest, dataset_id: int, part: str) -> HttpResponseBase:
    dataset = services.get_visible_dataset(request.user, dataset_id)
    return api.download(request, dataset, part)


@login_required
@require_POST
def dataset_clean(request: HttpRequest, dataset_id: int) -> HttpResponse:
    source = services.get_visible_dataset(request.user, dataset_id)
    form = CleanForm(request.POST)
    if not form.is_valid():
        for field, errors in form.errors.items():
            for error in errors:
                messages.error(request, f"{form.fields[field].label}: {error}" if field in form.fields else str(error))
        return redirect("datasets:detail", dataset_id=source.pk)
    try:
        dataset = services.start_cleaning(request.user, source, form.cleaned_data["options"], form.cleaned_data["name"])
    except Refusal as exc:
        _refusal_message(request, exc)
        return redirect("datasets:detail", dataset_id=source.pk)
    return redirect("datasets:detail", dataset_id=dataset.pk)


@login_required
@require_POST
def dataset_analyze(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = services.get_visible_dataset(request.user, dataset_id)
    try:
        services.require_owner(request.user, dataset, "re-analysed")
        services.start_analysis(dataset)
    except Refusal as exc:
        _refusal_message(request, exc)
    return redirect("datasets:detail", dataset_id=dataset.pk)


@login_required
@require_POST
def dataset_fields(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = services.get_visible_dataset(request.user, dataset_id)
    form = FieldsForm(request.POST)
    try:
        services.require_owner(request.user, dataset, "changed")
        if form.is_valid():
            services.update_fields(dataset, form.cleaned_data["text_field"], form.cleaned_data["label_field"])
        else:
            messages.error(request, "; ".join(f"{k}: {', '.join(str(e) for e in v)}" for k, v in form.errors.items()))
    except Refusal as exc:
        _refusal_message(request, exc)
    return redirect("datasets:detail", dataset_id=dataset.pk)


@login_required
@require_POST
def dataset_delete(request: HttpRequest, dataset_id: int) -> HttpResponse:
    dataset = services.get_visible_dataset(request.user, dataset_id)
    try:
        services.require_owner(request.user, dataset, "deleted")
        target = audit.Target.of(dataset)
        services.delete_dataset(dataset)
    except Refusal as exc:
        _refusal_message(request, exc)
        return redirect("datasets:detail", dataset_id=dataset.pk)
    audit.record(request, AuditAction.DELETION, target)
    messages.success(request, f"Deleted {dataset.name!r}.")
    return HttpResponseRedirect(reverse("datasets:list"))
