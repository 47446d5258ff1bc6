"""One tick of a sweep, the orchestration behind the thin ``sweeps.tick`` task (``workers.tasks.sweeps``).

Claim the sweep (a conditional update with a fencing token; a duplicate delivery finds it taken), then, against the
study in the platform's database:

1. adopt any trial the study handed out that has no row yet (a tick that died between the two);
2. follow each running trial's job: report its new validation points to the study, one by one, asking the pruner
   after each; a trial the pruner stops is told ``PRUNED`` and its job, if still going, is cancelled with the reason;
   a job that succeeded completes its trial with its best validation value; one that failed or was cancelled fails it;
3. on a stop, cancel the active trials' jobs and end the sweep;
4. submit the trials waiting for the owner's job limit, then ask the study for new ones while fewer than
   ``parallelism`` are active and the budget allows; each is an ordinary job (``builder.jobs.submit.submit_job``).
   A trial whose spec is refused (the spec's rules, the estimate for the queue's hardware) fails with that reason,
   without a job;
5. end the sweep once the budget is spent and nothing is active; otherwise wait for the next tick.

Killing a worker loses no trial: a trial's job is durable work of its own (it resumes from its checkpoint on another
worker and its trial stays attached to it), and a tick that dies is reaped and run again; each step above is
idempotent against what the study and the rows already say.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import Max, Min
from django.utils import timezone

from builder.core.durable import Claim, Heartbeat
from builder.core.errors import NON_FIELD, Refusal
from builder.core.redaction import describe_failure
from builder.jobs import lifecycle
from builder.jobs.models import ACTIVE_STATES, JobEvent, JobState, MetricPoint
from builder.jobs.submit import Submission, submit_job
from builder.sweeps import study as studies
from builder.sweeps.models import ACTIVE_TRIAL_STATES, Sweep, SweepState, Trial, TrialState
from builder.sweeps.space import apply, parameters_of
from builder.sweeps.work import SWEEPS, publish

log = logging.getLogger(__name__)


def run_tick(sweep_id: int, worker: str) -> dict[str, Any]:
    """Claim sweep ``sweep_id`` and run one tick; returns a small JSON-able summary."""
    close_old_connections()
    claim = SWEEPS.claim(sweep_id, worker)
    if claim is None:
        return {"sweep": sweep_id, "outcome": "not claimable"}
    sweep = Sweep.objects.select_related("owner", "dataset").get(pk=sweep_id)
    beat = Heartbeat(SWEEPS, claim, max(1.0, settings.SWEEP_TICK_LEASE_SECONDS / 4))
    try:
        with beat, studies.storage_session() as storage:
            outcome = Tick(sweep, storage, claim, beat).run()
    except Exception as exc:
        log.exception("sweep %s: the tick failed", sweep_id)
        message = describe_failure(exc)
        if sweep.attempts < SWEEPS.max_attempts:
            # Waiting again, with the reason: beat's poll ticks it again (a database or broker hiccup passes).
            SWEEPS.mine(claim).update(state=SweepState.WAITING, error=message)
        else:
            SWEEPS.finish(claim, SweepState.FAILED, error=f"gave up after {sweep.attempts} failed ticks: {message}")
        publish(sweep_id)
        return {"sweep": sweep_id, "outcome": "failed", "error": message}
    if outcome in (SweepState.FINISHED, SweepState.STOPPED):
        SWEEPS.finish(claim, outcome, attempts=0, error="")
    else:
        end_tick(claim)
    publish(sweep_id)
    return {"sweep": sweep_id, "outcome": str(outcome)}


def end_tick(claim: Claim) -> None:
    """Back to waiting, or straight to queued (and sent) when a tick was asked for while this one ran."""
    with transaction.atomic():
        if SWEEPS.mine(claim).filter(tick_again=False).update(state=SweepState.WAITING, attempts=0, error=""):
            return
        if SWEEPS.mine(claim).update(state=SweepState.QUEUED, attempts=0, error="", lease_owner=""):
            SWEEPS.dispatch(Sweep.objects.get(pk=claim.pk))


class Tick:
    """What one tick does (see the module docstring); every write is preceded by a check that the claim holds."""

    def __init__(self, sweep: Sweep, storage: Any, claim: Claim, beat: Heartbeat) -> None:
        self.sweep = sweep
        self.storage = storage
        self.claim = claim
        self.beat = beat
        self.params = parameters_of(sweep.space)
        self.distributions = {p.path: p.distribution() for p in self.params}
        self.study = studies.load(
            storage,
            sweep.study_name,
            maximize=sweep.maximize,
            pruner_kind=sweep.pruner,
            seed=sweep.seed,
            asked=sweep.trials.count(),
            budget=sweep.budget,
        )
        self.metric = sweep.objective
        self.results_changed = False

    def holding(self) -> bool:
        return not self.beat.lost.is_set() and SWEEPS.mine(self.claim).exists()

    def run(self) -> SweepState:
        self.adopt_orphans()
        self.follow_trials()
        self.sweep.refresh_from_db(fields=["stop_requested"])
        if self.sweep.stop_requested:
            self.stop_trials()
            self.update_importances()
            return SweepState.STOPPED
        if self.submit_pending():
            self.ask_new()
        if self.results_changed:
            self.update_importances()
        trials = self.sweep.trials
        if trials.count() >= self.sweep.budget and not trials.filter(state__in=ACTIVE_TRIAL_STATES).exists():
            self.update_importances()
            return SweepState.FINISHED
        return SweepState.WAITING

    # -- the study and the rows agree -------------------------------------------------------------------------------

    def adopt_orphans(self) -> None:
        """A trial the study handed out to a tick that died before recording it is recorded now (pending: its job
        is submitted below), so that no trial of the study is lost."""
        import optuna

        known = set(self.sweep.trials.values_list("number", flat=True))
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        for frozen in running:
            if frozen.number not in known:
                Trial.objects.get_or_create(sweep=self.sweep, number=frozen.number, defaults={"params": frozen.params})

    def tell(self, trial: Trial, *, value: float | None = None, pruned: bool = False) -> None:
        import optuna

        if value is not None:
            self.study.tell(trial.number, value, skip_if_finished=True)
        else:
            state = optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.FAIL
            self.study.tell(trial.number, state=state, skip_if_finished=True)
        self.results_changed = True

    def end_trial(self, trial: Trial, state: TrialState, reason: str = "", objective: float | None = None) -> None:
        Trial.objects.filter(pk=trial.pk).update(
            state=state, reason=reason, objective=objective, finished_at=timezone.now()
        )

    # -- following the running trials -----------------------------------------------------------------------------

    def follow_trials(self) -> None:
        for trial in self.sweep.trials.filter(state=TrialState.RUNNING).select_related("job").order_by("number"):
            if not self.holding():
                return
            self.follow(trial)

    def follow(self, trial: Trial) -> None:
        job = trial.job
        if job is None:
            self.tell(trial)
            self.end_trial(trial, TrialState.FAILED, "its job was deleted")
            return
        job.refresh_from_db()
        ended = job.state not in ACTIVE_STATES
        pruned_at = self.report_points(trial)
        if pruned_at is not None:
            step, value = pruned_at
            reason = self.prune_reason(step, value)
            self.tell(trial, pruned=True)
            # Its value where it was stopped (what Optuna records for a pruned trial): shown, never the best.
            self.end_trial(trial, TrialState.PRUNED, reason, objective=value)
            if not ended:
                with contextlib.suppress(Refusal):  # it ended a moment ago: the trial is pruned all the same
                    lifecycle.request_cancel(job, reason=reason)
            return
        if not ended:
            return
        if job.state == JobState.SUCCEEDED:
            best = self.best_value(job.pk)
            if best is None:
                self.tell(trial)
                self.end_trial(trial, TrialState.FAILED, f"its job recorded no {self.metric} (it never evaluated)")
            else:
                self.tell(trial, value=best)
                self.end_trial(trial, TrialState.COMPLETE, objective=best)
        elif job.state == JobState.CANCELLED:
            self.tell(trial)
            self.end_trial(trial, TrialState.CANCELLED, self.job_end_reason(job.pk) or "its job was cancelled")
        else:
            self.tell(trial)
            self.end_trial(trial, TrialState.FAILED, job.error or self.job_end_reason(job.pk) or "its job failed")

    def report_points(self, trial: Trial) -> tuple[int, float] | None:
        """Report the job's validation points after ``trial.reported_step`` to the study, asking the pruner after
        each (as an objective function would); returns (step, value) where it said prune."""
        assert trial.job_id is not None
        points = list(
            MetricPoint.objects.filter(job_id=trial.job_id, name=self.metric, step__gt=trial.reported_step)
            .order_by("step")
            .values_list("step", "value")
        )
        if not points:
            return None
        handle = studies.trial_handle(self.storage, self.study, trial.number)
        reported = trial.reported_step
        verdict = None
        for step, value in points:
            handle.report(float(value), step)
            reported = step
            if handle.should_prune():
                verdict = (step, float(value))
                break
        Trial.objects.filter(pk=trial.pk).update(reported_step=reported)
        return verdict

    def prune_reason(self, step: int, value: float) -> str:
        if self.sweep.pruner == "halving":
            return f"pruned at step {step}: {self.metric} {value:.4g} is not among the best of its rung"
        worse = "below" if self.sweep.maximize else "above"
        return f"pruned at step {step}: {self.metric} {value:.4g} is {worse} the median of finished trials"

    def best_value(self, job_id: int) -> float | None:
        points = MetricPoint.objects.filter(job_id=job_id, name=self.metric)
        best = points.aggregate(best=Max("value") if self.sweep.maximize else Min("value"))["best"]
        return None if best is None else float(best)

    @staticmethod
    def job_end_reason(job_id: int) -> str:
        event = JobEvent.objects.filter(job_id=job_id, kind="state").order_by("-seq").values_list("data", flat=True)
        data = event.first() or {}
        return str(data.get("reason") or "")

    # -- stopping ---------------------------------------------------------------------------------------------------

    def stop_trials(self) -> None:
        reason = "the sweep was stopped"
        for trial in self.sweep.trials.filter(state__in=ACTIVE_TRIAL_STATES).select_related("job"):
            if trial.job is not None and trial.job.state in ACTIVE_STATES:
                with contextlib.suppress(Refusal):  # it ended a moment ago
                    lifecycle.request_cancel(trial.job, reason=reason)
            self.tell(trial)
            self.end_trial(trial, TrialState.CANCELLED, reason)

    # -- new trials -------------------------------------------------------------------------------------------------

    def submit_pending(self) -> bool:
        """Submit the trials waiting for a job; False when the owner's job limit stopped one (try next tick)."""
        for trial in self.sweep.trials.filter(state=TrialState.PENDING).order_by("number"):
            if not self.holding() or not self.submit(trial):
                return False
        return True

    def ask_new(self) -> None:
        if not self.study.trials and self.sweep.first_trials:
            for values in self.sweep.first_trials:
                self.study.enqueue_trial(values, skip_if_exists=True)
        while self.holding():
            trials = self.sweep.trials
            if trials.count() >= self.sweep.budget:
                return
            if trials.filter(state__in=ACTIVE_TRIAL_STATES).count() >= self.sweep.parallelism:
                return
            asked = self.study.ask(self.distributions)
            trial, _ = Trial.objects.get_or_create(
                sweep=self.sweep, number=asked.number, defaults={"params": dict(asked.params)}
            )
            if not self.submit(trial):
                return

    def submit(self, trial: Trial) -> bool:
        """Submit ``trial``'s job; a refused spec fails the trial. False when the owner's job limit stopped it."""
        sweep = self.sweep
        if sweep.dataset is None:
            self.tell(trial)
            self.end_trial(trial, TrialState.FAILED, "the sweep's dataset was deleted")
            return True
        submission = Submission(
            name=f"{sweep.name[:180]} · trial {trial.number}",  # a job's name holds 200 characters
            dataset=sweep.dataset,
            queue=sweep.queue,
            spec=apply(sweep.base_spec, trial.params),
        )
        try:
            with transaction.atomic():
                job = submit_job(sweep.owner, submission)
                Trial.objects.filter(pk=trial.pk).update(job=job, state=TrialState.RUNNING, reason="")
        except Refusal as exc:
            if exc.field == NON_FIELD:
                # The owner's limit of active jobs: the trial waits for one of them to end (its end ticks again).
                Trial.objects.filter(pk=trial.pk).update(reason=f"waiting: {exc.errors[0].message}")
                return False
            # The spec's rules or the estimate for the queue's hardware refused it: a result of the search.
            self.tell(trial)
            self.end_trial(trial, TrialState.FAILED, f"refused before dispatch: {exc}")
        return True

    # -- what the page shows ----------------------------------------------------------------------------------------

    def update_importances(self) -> None:
        Sweep.objects.filter(pk=self.sweep.pk).update(importances=studies.importances(self.study))
