"""Who may see a job: its owner and the users it is shared with. Everyone else gets a 404, never a 403,
so that the existence of another user's job is not revealed."""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet
from django.http import Http404

from builder.jobs.models import Job


def visible_jobs(user: Any) -> QuerySet[Job]:
    if not user.is_authenticated:
        return Job.objects.none()
    return Job.objects.filter(Q(owner=user) | Q(shared_with=user)).distinct()


def get_visible_job(user: Any, job_id: int) -> Job:
    job = visible_jobs(user).filter(pk=job_id).first()
    if job is None:
        raise Http404("no such job")
    return job


def can_control(user: Any, job: Job) -> bool:
    """Only the owner cancels or resumes; people it is shared with watch."""
    return bool(user.is_authenticated and job.owner_id == user.pk)
