"""The launch form: which saved configuration to train, on which dataset, on which queue."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from django import forms

from builder.checkpoints.services import own_checkpoints
from builder.core import hardware_classes
from builder.core.errors import NON_FIELD, Refusal
from builder.core.parsers import db_int
from builder.jobs.submit import (
    Submission,
    default_dataset,
    queues,
    visible_config_versions,
    visible_ready_datasets,
)


class _VersionChoice(forms.ModelChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        return _version_label(obj)


class _DatasetChoice(forms.ModelChoiceField):
    def label_from_instance(self, obj: Any) -> str:
        origin = "built-in" if obj.is_builtin else "yours"
        return f"{obj.name} ({origin}, {obj.format})"


class LaunchForm(forms.Form):
    """Built for one user: the choices are that user's saved configuration versions and the datasets they may
    train on (their own and the built-in ones, ready). An id outside those is refused as an invalid choice."""

    config_version = _VersionChoice(queryset=None, label="Configuration", empty_label=None)
    dataset = _DatasetChoice(queryset=None, label="Dataset", empty_label=None)
    queue = forms.ChoiceField(
        choices=lambda: [(name, _class_label(name)) for name in queues()], label="Hardware class", required=False
    )
    name = forms.CharField(max_length=200, required=False, help_text="Default: the configuration's name.")
    init_checkpoint: forms.ModelChoiceField[Any] = forms.ModelChoiceField(
        queryset=None,
        required=False,
        label="Start from",
        empty_label="random initialisation",
        help_text="One of your imported checkpoints (Checkpoints): its weights and tokenizer; the configuration's "
        "model must be the checkpoint's.",
    )

    def __init__(self, user: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.user = user
        config_field = self.fields["config_version"]
        assert isinstance(config_field, forms.ModelChoiceField)
        config_field.queryset = visible_config_versions(user)
        dataset_field = self.fields["dataset"]
        assert isinstance(dataset_field, forms.ModelChoiceField)
        dataset_field.queryset = visible_ready_datasets(user).order_by("owner", "name")
        checkpoint_field = self.fields["init_checkpoint"]
        assert isinstance(checkpoint_field, forms.ModelChoiceField)
        checkpoint_field.queryset = own_checkpoints(user)

    @staticmethod
    def initial_for(user: Any, query: Mapping[str, str]) -> dict[str, Any]:
        """Initial values: the configuration named in the query (when it is the user's), the demo corpus."""
        initial: dict[str, Any] = {"queue": hardware_classes.default_class()}
        dataset = default_dataset(user)
        if dataset is not None:
            initial["dataset"] = dataset.pk
        version = db_int(query.get("config_version", ""))
        if version is not None and visible_config_versions(user).filter(pk=version).exists():
            initial["config_version"] = version
        checkpoint = db_int(query.get("init_checkpoint", ""))
        if checkpoint is not None and own_checkpoints(user).filter(pk=checkpoint).exists():
            initial["init_checkpoint"] = checkpoint
        return initial

    def clean_queue(self) -> str:
        # The quick launch (templates/jobs/_launch_form.html) names no class: the default one.
        queue = str(self.cleaned_data.get("queue") or hardware_classes.default_class())
        if queue not in queues():
            raise forms.ValidationError(f"choose one of {', '.join(queues())}")
        return queue

    def submission(self) -> Submission:
        data = self.cleaned_data
        version = data["config_version"]
        name = data["name"] or _version_label(version)
        return Submission(
            name=name[:200],
            dataset=data["dataset"],
            queue=data["queue"],
            config_version=version,
            init_checkpoint=data.get("init_checkpoint"),
        )

    def add_refusal(self, refusal: Refusal) -> None:
        """Show each of the service's errors next to its field (spec problems belong to the configuration)."""
        for field, messages in refusal.by_field().items():
            target = {"spec": "config_version", NON_FIELD: None}.get(field, field)
            for message in messages:
                self.add_error(target if target in self.fields else None, message)


def _class_label(name: str) -> str:
    """``gpu.t4: 1 × NVIDIA T4 16 GB`` (what each worker of the class has)."""
    hardware_class = hardware_classes.get_class(name)
    if hardware_class is None:
        return name
    unit = "process" if hardware_class.hardware.kind == "cpu" else "device"
    plural = "es" if unit == "process" else "s"
    count = f"{hardware_class.devices} {unit}{plural if hardware_class.devices != 1 else ''}"
    return f"{name}: {hardware_class.hardware.name}, {count}"


def _version_label(version: Any) -> str:
    return str(version)
