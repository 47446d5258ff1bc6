"""Reading the metric record back: full history (downsampled with a min/max envelope), gaps, CSV."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from builder.jobs.models import Job, MetricPoint

MAX_POINTS_PER_SERIES = 1500


def history(job: Job, max_points: int = MAX_POINTS_PER_SERIES, names: list[str] | None = None) -> dict[str, Any]:
    """Every series of the job up to now (or only ``names``), as ``{"seq": H, "series": {name: {...}}}``.

    ``H`` is the job's last sequence number read *before* the points, and only points with ``seq <= H`` are
    returned: a batch committed while this runs is left out whole, so a live stream that relays everything
    after ``H`` continues this history with no gap and no duplicate (a truncation after a crash lowers no
    sequence number, so ``H`` never points back into deleted points).

    A series with more than ``max_points`` points is cut into buckets of consecutive steps; each bucket gives its
    last step, its mean and its min and max, so a one-step spike in a long run still shows in the envelope.
    Short series come back whole (``min``/``max`` omitted).
    """
    last_seq = Job.objects.values_list("metric_seq", flat=True).get(pk=job.pk)
    rows = MetricPoint.objects.filter(job=job, seq__lte=last_seq)
    if names is not None:
        rows = rows.filter(name__in=names)
    by_name: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step, name, value in rows.order_by("name", "step").values_list("step", "name", "value").iterator(5000):
        by_name[name].append((step, value))
    return {"seq": last_seq, "series": {name: downsample(points, max_points) for name, points in by_name.items()}}


def downsample(points: list[tuple[int, float]], max_points: int) -> dict[str, list[float]]:
    """``points`` (sorted by step) as ``{"step", "value"}``, or at most ``max_points`` buckets of consecutive
    steps with ``{"step": last step, "value": mean, "min", "max"}`` (the envelope keeps every extreme)."""
    if len(points) <= max_points:
        return {"step": [s for s, _ in points], "value": [v for _, v in points]}
    size = -(-len(points) // max_points)  # ceil: at most max_points buckets
    out: dict[str, list[float]] = {"step": [], "value": [], "min": [], "max": []}
    for i in range(0, len(points), size):
        bucket = points[i : i + size]
        values = [v for _, v in bucket]
        out["step"].append(bucket[-1][0])
        out["value"].append(sum(values) / len(values))
        out["min"].append(min(values))
        out["max"].append(max(values))
    return out


def eta_seconds(job: Job) -> float | None:
    """Seconds left for a running job: remaining steps × the latest measured step time (None when unknown)."""
    if job.state != "running" or not job.total_steps:
        return None
    latest = (
        MetricPoint.objects.filter(job=job, name="step_time_s").order_by("-step").values_list("value", flat=True)
    ).first()
    if latest is None:
        return None
    return max(0.0, (job.total_steps - job.step) * latest)


def points_after(job: Job, after: int, limit: int = 10000) -> list[list[Any]]:
    """Exact points with ``seq > after`` in sequence order, as ``[seq, step, name, value]``."""
    rows = MetricPoint.objects.filter(job=job, seq__gt=after).order_by("seq")[:limit]
    return [[p.seq, p.step, p.name, p.value] for p in rows]


def csv_rows(job: Job) -> Iterator[str]:
    """The record as CSV (step, name, value), streamed in chunks."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["step", "name", "value"])
    rows = MetricPoint.objects.filter(job=job).order_by("step", "name").values_list("step", "name", "value")
    for i, row in enumerate(rows.iterator(chunk_size=5000)):
        writer.writerow(row)
        if i % 2000 == 1999:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
