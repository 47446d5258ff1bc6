"""The job runner (``builder.jobs.runner.run_job``) in this process, on a job folder that a killed attempt left.

No services: the job's stream goes to an in-memory channel layer and the tasks it sends by name are noted, not sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from builder.core import enqueue
from builder.datasets.models import Dataset
from builder.jobs import lifecycle
from builder.jobs.files import claim_folder, resolve_data
from builder.jobs.models import Job, JobEvent, JobState, MetricPoint
from builder.jobs.runner import run_job
from builder.jobs.sink import DatabaseStreamSink
from tests.builder.test_jobs import CORPUS, tiny_spec
from workers.engine.data import prepare
from workers.engine.sinks import FanoutSink, JsonlSink, TensorBoardSink
from workers.engine.spec import load_spec
from workers.engine.train import train

# The runner's sink thread writes through a database connection of its own: it must see the test's rows.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def no_broker(settings: Any, monkeypatch: Any) -> list[tuple[str, tuple[Any, ...], str]]:
    """The channel layer in memory; tasks sent by name (``builder.core.enqueue.send``) are noted here instead."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    sent: list[tuple[str, tuple[Any, ...], str]] = []

    def note(name: str, *args: Any, queue: str) -> bool:
        sent.append((name, args, queue))
        return True

    monkeypatch.setattr(enqueue, "send", note)
    return sent


def test_an_attempt_resuming_past_the_recorded_checkpoint_keeps_every_step_of_the_killed_one(
    alice: Any, media_root: Path, settings: Any, tmp_path: Path, no_broker: Any
) -> None:
    settings.JOBS_WORK_DIR = tmp_path / "jobs"
    name = default_storage.save("datasets/test/corpus.txt", ContentFile(CORPUS.encode()))
    dataset = Dataset.objects.create(
        owner=alice, name="corpus", format="txt", file_name=name, size_bytes=len(CORPUS), state="ready"
    )
    spec_dict = tiny_spec(20, checkpoint_interval=5)
    job = Job.objects.create(owner=alice, name="j", spec=spec_dict, dataset=dataset, data_source=name, queue="gpu")

    # The first attempt records its points and commits its step-10 checkpoint, and is killed before the database
    # records that checkpoint: the row still names step 5 (the reaper queues the job again).
    lease = lifecycle.claim(job.pk, "one@h")
    assert lease is not None
    spec = load_spec(spec_dict)
    layout = claim_folder(job)
    prepared = prepare(spec, resolve_data(job, layout), layout.run.prepared_data)
    stream = DatabaseStreamSink(lease)
    first = FanoutSink(JsonlSink(layout.run.metrics), stream, TensorBoardSink(layout.run.tensorboard))
    assert train(spec, prepared, layout.run.root, first, stop_after_step=10, device="cpu").step == 10
    first.close()
    Job.objects.filter(pk=job.pk).update(state=JobState.QUEUED, last_checkpoint_step=5)

    # The next attempt resumes from the folder's newest checkpoint (step 10), past the row's step 5.
    outcome = run_job(job.pk, "two@h")

    assert outcome["outcome"] == "completed" and JobEvent.objects.get(job=job, kind="resume").step == 10
    losses = list(MetricPoint.objects.filter(job=job, name="loss").order_by("step").values_list("step", flat=True))
    assert losses == list(range(1, 21))
    events = EventAccumulator(str(layout.run.tensorboard), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 21))
