"""What the API and the websocket say about a job."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from rest_framework import serializers

from builder.configs.models import ConfigVersion
from builder.configs.serializers import SpecJSON
from builder.configs.services import spec_status
from builder.core.errors import UNPROCESSABLE, Refusal
from builder.datasets.models import DatasetState
from builder.datasets.services import visible_datasets
from builder.jobs import lifecycle
from builder.jobs.history import eta_seconds
from builder.jobs.models import Job
from builder.jobs.submit import Submission, queues, visible_config_versions
from workers.engine.spec import load_spec, spec_errors


def job_summary(job: Job) -> dict[str, Any]:
    """The compact state of a job, shared by the API, the websocket and the pages."""
    return {
        "id": job.pk,
        "name": job.name,
        "state": job.state,
        "queue": job.queue,
        "step": job.step,
        "total_steps": job.total_steps,
        "progress": round(job.progress, 4),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "cancel_requested": job.cancel_requested,
        "last_checkpoint_step": job.last_checkpoint_step,
        "queue_position": lifecycle.queue_position(job),
        "eta_seconds": eta_seconds(job),
        "dataset": job.dataset_id,
        "dataset_name": job.dataset.name if job.dataset is not None else None,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "error": job.error,
        "result": job.result,
    }


class JobSerializer(serializers.ModelSerializer[Job]):
    progress = serializers.FloatField(read_only=True)
    queue_position = serializers.SerializerMethodField(help_text="1 = next on its queue; null unless queued.")
    eta_seconds = serializers.SerializerMethodField(help_text="Seconds left (running jobs), from the step time.")
    owner = serializers.CharField(source="owner.username", read_only=True)
    dataset_name = serializers.CharField(source="dataset.name", read_only=True, default=None, allow_null=True)

    class Meta:
        model = Job
        fields = [
            "id", "name", "owner", "state", "queue", "spec", "dataset", "dataset_name", "data_source", "step",
            "total_steps", "progress",
            "attempts", "max_attempts", "cancel_requested", "last_checkpoint_step", "queue_position",
            "eta_seconds",
            "created_at", "started_at", "finished_at", "error", "result", "init_checkpoint",
        ]  # fmt: skip
        read_only_fields = fields

    def get_queue_position(self, job: Job) -> int | None:
        return lifecycle.queue_position(job)

    def get_eta_seconds(self, job: Job) -> float | None:
        return eta_seconds(job)


class JobCreateSerializer(serializers.Serializer[dict[str, Any]]):
    """``POST /api/jobs``: the spec (inline, or a saved configuration version), a dataset, a queue and a name.

    Needs ``context={"request": ...}``: the dataset must be one the requesting user may see (their own or a
    built-in one) and ready; any other id is answered as if it did not exist.
    """

    name = serializers.CharField(max_length=200, required=False, help_text="Default: the configuration's name.")
    spec = SpecJSON(required=False, help_text="An inline spec (see GET /api/specs/schema); or give config_version.")
    config_version = serializers.IntegerField(
        required=False, min_value=1, help_text="Id of one of your saved configuration versions; or give spec."
    )
    dataset = serializers.IntegerField(
        min_value=1, help_text="Id of a ready dataset (yours or built-in); it sets data.text_field/label_field."
    )
    init_checkpoint = serializers.IntegerField(
        required=False,
        min_value=1,
        help_text="Id of one of your imported checkpoints (POST /api/checkpoints) to start from: its weights and "
        "tokenizer; the spec's model must match the checkpoint's (its spec).",
    )
    queue = serializers.ChoiceField(
        choices=(),  # the hardware classes, set per instance (below) from QUEUE_HARDWARE: the schema lists them
        required=False,
        help_text="The hardware class to train on (GET /api/hardware/classes); default: JOBS_DEFAULT_QUEUE (gpu).",
        error_messages={"invalid_choice": '"{input}" is not a hardware class (GET /api/hardware/classes lists them)'},
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        queue = self.fields["queue"]
        assert isinstance(queue, serializers.ChoiceField)
        queue.choices = list(queues())

    def validate_spec(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError("spec must be a JSON object")
        try:
            load_spec(value)
        except ValidationError as exc:
            # Field paths below spec, e.g. "spec.model.moe.top_k", so the client can point at the field.
            problems = [f"{e['path']}: {e['message']}" for e in spec_errors(exc)]
            if spec_status(exc) != 400:  # it matches the published schema but breaks a rule between fields
                raise Refusal.of((("spec", problem) for problem in problems), spec_status(exc)) from None
            raise serializers.ValidationError(problems) from None
        return value

    def validate_dataset(self, value: int) -> Any:
        request = self.context["request"]
        dataset = visible_datasets(request.user).filter(pk=value).first()
        if dataset is None:
            raise serializers.ValidationError(f"no dataset with id {value}", code=UNPROCESSABLE)
        if dataset.state != DatasetState.READY or not dataset.file_name:
            # The id is right; the dataset's state is not (yet): a conflict, not a malformed request.
            raise Refusal(
                "dataset", f"dataset {value} is {dataset.state}; only a ready dataset can be trained on", status=409
            )
        return dataset

    def validate_init_checkpoint(self, value: int) -> Any:
        from builder.checkpoints.services import own_checkpoints

        checkpoint = own_checkpoints(self.context["request"].user).filter(pk=value).first()
        if checkpoint is None:  # someone else's is answered as if it did not exist
            raise serializers.ValidationError(f"no imported checkpoint of yours with id {value}", code=UNPROCESSABLE)
        return checkpoint

    def validate_config_version(self, value: int) -> ConfigVersion:
        version = visible_config_versions(self.context["request"].user).filter(pk=value).first()
        if version is None:
            raise serializers.ValidationError(f"no configuration version with id {value}", code=UNPROCESSABLE)
        return version

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if ("spec" in attrs) == ("config_version" in attrs):
            message = (
                "give either spec or config_version" if "spec" not in attrs else "give spec or config_version, not both"
            )
            raise Refusal("spec", message, 422)  # each field alone is well-formed: a rule between them
        if "name" not in attrs:
            if "config_version" not in attrs:
                # A rule between fields (name is optional with config_version only): 422, not a malformed request.
                raise Refusal("name", "a job with an inline spec needs a name", 422)
            attrs["name"] = str(attrs["config_version"])[:200]
        return attrs

    def submission(self) -> Submission:
        data = self.validated_data
        return Submission(
            name=data["name"],
            dataset=data["dataset"],
            queue=data.get("queue", ""),
            spec=data.get("spec"),
            config_version=data.get("config_version"),
            init_checkpoint=data.get("init_checkpoint"),
        )


class MetricsPageSerializer(serializers.Serializer[dict[str, Any]]):
    after = serializers.IntegerField()
    next_after = serializers.IntegerField()
    points = serializers.ListField(child=serializers.ListField(), help_text="[seq, step, name, value] rows")
