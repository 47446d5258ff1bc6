"""The sweeps' Optuna studies, stored in the platform's own database (``DATABASES["default"]``) through Optuna's RDB
storage: SQLite's file in the embedded default, PostgreSQL when configured. The web server, beat and every worker
open the same tables, so any of them can carry a sweep on, and a restart loses nothing.

Optuna's tables are created by this app's migration (``0002_optuna_tables``), not on first use: two workers that
tick at once would otherwise race to create them.

On SQLite every transaction begins ``IMMEDIATE`` (as Django's do here): a transaction that reads, then writes while
the trials' metric sinks write, would otherwise fail at once with "database is locked" instead of waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from django.db import connections

# Trials the sampler draws at random before TPE models the results (TPE's own default is 10: too many for the
# budgets of a few trials that a person launches here).
MAX_RANDOM_STARTUP_TRIALS = 10
# Completed trials the median pruner waits for before it prunes anything (with one, its "median" would be that one
# trial, and every trial worse than it would be stopped).
PRUNER_STARTUP_TRIALS = 2


def storage_url(alias: str = "default") -> Any:
    """SQLAlchemy's URL of the Django database ``alias`` (its test database too, once tests switched to it)."""
    from sqlalchemy.engine import URL

    conn = connections[alias]
    params = conn.settings_dict
    vendor = conn.vendor
    if vendor == "sqlite":
        name = str(params["NAME"])
        if name == ":memory:" or name.startswith("file:"):
            raise ImproperlyConfigured("sweeps need a database file (an in-memory SQLite database is per process)")
        return URL.create("sqlite", database=name)
    if vendor == "postgresql":
        return URL.create(
            "postgresql+psycopg",
            username=params.get("USER") or None,
            password=params.get("PASSWORD") or None,
            host=params.get("HOST") or None,
            port=int(params["PORT"]) if params.get("PORT") else None,
            database=params.get("NAME") or None,
        )
    raise ImproperlyConfigured(f"sweeps store their studies in SQLite or PostgreSQL, not {vendor}")


def open_storage(skip_table_creation: bool = True) -> Any:
    """Optuna's RDB storage on the platform's database. Close it with ``close_storage``."""
    import optuna
    from sqlalchemy import event

    url = storage_url()
    sqlite = url.drivername == "sqlite"
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if sqlite:
        # isolation_level None: pysqlite then leaves transactions to us, and the "begin" hook below starts them.
        engine_kwargs["connect_args"] = {"timeout": 30, "isolation_level": None}
    storage = optuna.storages.RDBStorage(
        url.render_as_string(hide_password=False),
        engine_kwargs=engine_kwargs,
        skip_table_creation=skip_table_creation,
        skip_compatibility_check=True,
    )
    if sqlite:

        @event.listens_for(storage.engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    return storage


def close_storage(storage: Any) -> None:
    storage.engine.dispose()


@contextmanager
def storage_session() -> Iterator[Any]:
    """Open the storage for one tick and release its connections afterwards (workers are forked processes: no
    connection may outlive the tick that opened it)."""
    storage = open_storage()
    try:
        yield storage
    finally:
        close_storage(storage)


def sampler(seed: int, trials_so_far: int, budget: int) -> Any:
    """TPE. Each tick builds its own sampler, so its seed moves on with the trials already asked: a sampler seeded
    the same way at every tick would draw the same random trial each time."""
    import optuna

    startup = max(2, min(MAX_RANDOM_STARTUP_TRIALS, budget // 3))
    return optuna.samplers.TPESampler(seed=seed + trials_so_far, n_startup_trials=startup)


def pruner(kind: str) -> Any:
    """The median pruner (against finished trials at the same step), or successive halving."""
    import optuna

    if kind == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)


def load(storage: Any, study_name: str, *, maximize: bool, pruner_kind: str, seed: int, asked: int, budget: int) -> Any:
    """The sweep's study (created on first use), with a sampler for the next ask and its pruner."""
    import optuna

    # Optuna says "Using an existing study" at every load, i.e. at every tick: only its warnings go to the log.
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    return optuna.create_study(
        storage=storage,
        study_name=study_name,
        direction="maximize" if maximize else "minimize",
        sampler=sampler(seed, asked, budget),
        pruner=pruner(pruner_kind),
        load_if_exists=True,
    )


def trial_handle(storage: Any, study: Any, number: int) -> Any:
    """A live ``optuna.Trial`` for trial ``number`` of ``study`` in ``storage`` (to report intermediate values and ask
    the pruner, from whichever process ticks)."""
    import optuna

    study_id = storage.get_study_id_from_name(study.study_name)
    return optuna.trial.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, number))


def importances(study: Any) -> dict[str, float]:
    """Optuna's parameter importances over the finished trials (``get_param_importances`` with its PED-ANOVA
    evaluator, which needs no scikit-learn); empty until two trials have completed."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}  # Optuna would call every parameter equally important: say nothing instead
    try:
        found = optuna.importance.get_param_importances(study, evaluator=PedAnovaImportanceEvaluator())
    except (ValueError, RuntimeError):
        return {}
    return {name: round(float(value), 6) for name, value in found.items()}
