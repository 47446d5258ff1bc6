"""A job's folder on the worker that trains it: where it is, whose it is, and the local copy of its data.

The names inside the folder are the engine's (``workers.engine.layout``); this module only says where the folder
of a job row is (``JOBS_WORK_DIR/job-<id>``) and makes it ready for that row. With remote storage (S3) the folder is
a cache: ``builder.jobs.remote`` keeps its contents in the bucket and fills it from there on any host.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from django.conf import settings

from builder.datasets.storage import fetch, local_path
from builder.jobs.models import Job
from workers.engine.layout import JobLayout

log = logging.getLogger(__name__)


def job_layout(job_id: int) -> JobLayout:
    """The job's working folder on this worker: checkpoints, TensorBoard logs, tokenized data."""
    return JobLayout(Path(settings.JOBS_WORK_DIR) / f"job-{job_id}")


def owner_key(job: Job) -> dict[str, Any]:
    """What ``owner.json`` holds: the row's id and creation time (an id alone may be reused)."""
    return {"job": job.pk, "created_at": job.created_at.isoformat()}


def claim_folder(job: Job) -> JobLayout:
    """The job's folder, made ready for this job row: emptied first when another row with the same id left it.

    The engine resumes from whatever checkpoint the folder holds, so a folder must never outlive its row and be
    found by a new one: SQLite gives a new row the id of a deleted last one, and a test database is flushed
    between tests. ``owner.json`` records whose folder it is (id and creation time).
    """
    layout = job_layout(job.pk)
    key = owner_key(job)
    if layout.root.exists():
        try:
            current = json.loads(layout.owner.read_text())
        except (OSError, ValueError):
            current = None
        if current != key:
            log.warning("job %s: removing a folder left by an earlier job with the same id (%s)", job.pk, current)
            shutil.rmtree(layout.root)
    layout.root.mkdir(parents=True, exist_ok=True)
    if not layout.owner.exists():
        layout.owner.write_text(json.dumps(key))
    layout.adopt_legacy_files()
    return layout


def resolve_data(job: Job, layout: JobLayout) -> Path:
    """A local file with the job's training data, copied from storage when storage is not the local disk.

    The engine reads the format from the file name's extension; when the dataset says otherwise (an upload
    named ``notes`` declared as JSONL), the file is linked under a name with the right extension.
    """
    from workers.engine.data import detect_format

    name = job.data_source
    local = local_path(name)
    if local is None:
        # Remote storage (S3): stream the object into the job folder once; later attempts reuse it.
        local = layout.source_data / Path(name).name
        if not local.exists():
            fetch(name, local)
    declared = job.dataset.format if job.dataset is not None else ""
    if declared and detect_format(local) != declared:
        linked = layout.source_data / f"source.{declared}"
        linked.parent.mkdir(parents=True, exist_ok=True)
        linked.unlink(missing_ok=True)
        linked.symlink_to(local.resolve())
        return linked
    return local
