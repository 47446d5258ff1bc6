"""What the sweeps API accepts and returns (published in the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from builder.core.parsers import MAX_DB_INT, BoundedJSONField
from builder.sweeps.models import Objective, Pruner, SweepState, TrialState
from builder.sweeps.services import SweepRequest


class ParameterSerializer(serializers.Serializer[dict[str, Any]]):
    """One dimension of the search space (published shape; ``builder.sweeps.space`` checks it against the spec)."""

    path = serializers.CharField(help_text="Dotted spec path, e.g. training.optimizer.lr or model.moe.top_k.")
    kind = serializers.ChoiceField(choices=["float", "int", "choice"])
    low = serializers.FloatField(required=False, help_text="float/int: the lowest value.")
    high = serializers.FloatField(required=False, help_text="float/int: the highest value.")
    log = serializers.BooleanField(required=False, help_text="float/int: sample on a log scale.")
    step = serializers.IntegerField(required=False, min_value=1, help_text="int: the step between values.")
    choices = serializers.ListField(child=serializers.JSONField(), required=False, help_text="choice: the values.")


@extend_schema_field(ParameterSerializer(many=True))
class SpaceField(BoundedJSONField):
    """The search space as given: checked against the base spec by the service (``builder.sweeps.space``), which
    names ``space.<i>.<key>`` (a nested serializer would coerce "4" and 1e-4 alike before the spec can refuse)."""


@extend_schema_field({"type": "array", "items": {"type": "object", "additionalProperties": True}})
class FirstTrialsField(BoundedJSONField):
    """Parameter sets ({path: value}) as given: the service checks each value against the space."""


class SweepCreateSerializer(serializers.Serializer[dict[str, Any]]):
    name = serializers.CharField(max_length=200)
    config_version = serializers.IntegerField(
        min_value=1, max_value=MAX_DB_INT, help_text="A saved configuration version of yours."
    )
    dataset = serializers.IntegerField(min_value=1, max_value=MAX_DB_INT, help_text="A ready dataset you may train on.")
    space = SpaceField(help_text="The search space; each path and bound is checked against the spec.")
    objective = serializers.ChoiceField(choices=Objective.choices, default=Objective.VAL_LOSS)
    budget = serializers.IntegerField(
        min_value=1, max_value=10000, default=6, help_text="Trials in all (SWEEP_MAX_TRIALS at most)."
    )
    parallelism = serializers.IntegerField(min_value=1, max_value=16, default=2, help_text="Trials training at once.")
    pruner = serializers.ChoiceField(choices=Pruner.choices, default=Pruner.MEDIAN)
    queue = serializers.CharField(required=False, default="", allow_blank=True, help_text="Hardware class.")
    seed = serializers.IntegerField(min_value=0, max_value=2**31 - 1, default=0)
    first_trials = FirstTrialsField(
        required=False,
        help_text="Parameter sets ({path: value}) to try before the sampler's, e.g. the configuration's own values.",
    )

    def sweep_request(self) -> SweepRequest:
        data = self.validated_data
        return SweepRequest(
            name=data["name"],
            config_version=data["config_version"],
            dataset=data["dataset"],
            space=data["space"],
            objective=data["objective"],
            budget=data["budget"],
            parallelism=data["parallelism"],
            pruner=data["pruner"],
            queue=data.get("queue", ""),
            seed=data["seed"],
            first_trials=data.get("first_trials"),
        )


class TrialSerializer(serializers.Serializer[dict[str, Any]]):
    number = serializers.IntegerField()
    state = serializers.ChoiceField(choices=TrialState.choices)
    params = serializers.DictField(child=serializers.JSONField(), help_text="Spec path → the value it tries.")
    objective = serializers.FloatField(
        allow_null=True, help_text="Complete: its best validation value; pruned: its value where it was stopped."
    )
    reason = serializers.CharField(help_text="Why it ended so (pruned, refused, failed, cancelled) or waits.")
    job = serializers.IntegerField(allow_null=True, help_text="The job that runs it (null: refused or waiting).")
    job_state = serializers.CharField(allow_null=True)
    step = serializers.IntegerField(allow_null=True)
    total_steps = serializers.IntegerField(allow_null=True)
    dashboard = serializers.CharField(allow_null=True, help_text="The job's dashboard page.")


class BestSerializer(serializers.Serializer[dict[str, Any]]):
    number = serializers.IntegerField()
    objective = serializers.FloatField()
    params = serializers.DictField(child=serializers.JSONField())


class SavedVersionSerializer(serializers.Serializer[dict[str, Any]]):
    id = serializers.IntegerField()
    number = serializers.IntegerField()
    note = serializers.CharField()


class SweepSerializer(serializers.Serializer[dict[str, Any]]):
    """A sweep as ``builder.sweeps.services.snapshot`` shows it."""

    id = serializers.IntegerField()
    name = serializers.CharField()
    state = serializers.ChoiceField(choices=SweepState.choices)
    running = serializers.BooleanField(help_text="False once finished, stopped or failed.")
    stop_requested = serializers.BooleanField()
    error = serializers.CharField()
    objective = serializers.ChoiceField(choices=Objective.choices)
    direction = serializers.ChoiceField(choices=["minimize", "maximize"])
    budget = serializers.IntegerField()
    parallelism = serializers.IntegerField()
    pruner = serializers.ChoiceField(choices=Pruner.choices)
    queue = serializers.CharField()
    seed = serializers.IntegerField()
    config_version = serializers.IntegerField(allow_null=True)
    config = serializers.IntegerField(allow_null=True)
    config_name = serializers.CharField(allow_null=True)
    dataset = serializers.IntegerField(allow_null=True)
    space = ParameterSerializer(many=True)
    first_trials = serializers.ListField(child=serializers.DictField(child=serializers.JSONField()))
    trials = TrialSerializer(many=True)
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="Trials by state.")
    active = serializers.IntegerField(help_text="Trials pending or running.")
    best = BestSerializer(allow_null=True)
    importances = serializers.DictField(child=serializers.FloatField(), help_text="Optuna's parameter importances.")
    saved_version = SavedVersionSerializer(allow_null=True)
    created_at = serializers.DateTimeField()
    finished_at = serializers.DateTimeField(allow_null=True)


class SaveBestSerializer(serializers.Serializer[dict[str, Any]]):
    note = serializers.CharField(required=False, allow_blank=True, max_length=300, default="")
