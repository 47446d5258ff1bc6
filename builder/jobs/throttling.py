"""The rate limit on job submissions (``REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["jobs"]``), per user, shared by
``POST /api/jobs`` and the launch form: one counter (``builder.core.ratelimit``), whichever door a submission takes.
The limit of active jobs per user bounds what runs; this bounds how fast anyone can knock on the queue."""

from __future__ import annotations

from typing import Any

from builder.core.ratelimit import CounterThrottle, RateLimit

SUBMISSIONS = RateLimit("jobs")


class SubmissionThrottle(CounterThrottle):
    """DRF's throttle of ``POST /api/jobs`` (429 with ``Retry-After``)."""

    scope = SUBMISSIONS.scope


def submission_wait(user: Any) -> int | None:
    """Count one submission by ``user`` through a form; the seconds to wait when it is over the limit, else None."""
    return SUBMISSIONS.hit(f"user-{user.pk}")
