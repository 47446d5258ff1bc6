#!/bin/sh
# The image's entry point: one role per container, chosen by the first argument (the compose file and the Kubernetes
# manifests name it); anything else runs as given (`docker run IMAGE python manage.py shell`).
#
#   web      the ASGI server (uvicorn) on 0.0.0.0:${PORT:-8000}, ${WEB_WORKERS:-2} processes on one socket
#   worker   a Celery worker on ${WORKER_QUEUES:-gpu} (training and evaluation; one job at a time by default)
#   beat     Celery beat: the reaper and redelivery (run exactly one)
#   init     migrations, the built-in datasets, and the first administrator when DJANGO_SUPERUSER_USERNAME,
#            DJANGO_SUPERUSER_PASSWORD and DJANGO_SUPERUSER_EMAIL are set and that user does not exist yet
#            (idempotent: run it on every deploy)
set -eu

role="${1:-web}"
case "$role" in
  web)
    shift || true
    # Several processes share the one listening socket; Channels groups go through Redis, so a viewer on any
    # process gets every job's stream. Options as platform/supervisord.conf and the tests run it.
    exec uvicorn builder.asgi:application --host 0.0.0.0 --port "${PORT:-8000}" --workers "${WEB_WORKERS:-2}" \
      --lifespan off --ws websockets --timeout-graceful-shutdown 5 --timeout-keep-alive 75 --no-access-log "$@"
    ;;
  worker)
    shift
    exec celery -A workers.celery worker --queues "${WORKER_QUEUES:-gpu}" --concurrency "${WORKER_CONCURRENCY:-1}" \
      --hostname "${WORKER_NAME:-worker}@%h" --loglevel "${LOG_LEVEL:-INFO}" "$@"
    ;;
  beat)
    shift
    exec celery -A workers.celery beat --loglevel "${LOG_LEVEL:-INFO}" "$@"
    ;;
  init)
    python manage.py migrate --noinput
    python manage.py ensure_demo_datasets
    if [ -n "${DJANGO_SUPERUSER_USERNAME:-}" ] && [ -n "${DJANGO_SUPERUSER_PASSWORD:-}" ]; then
      # Django's own createsuperuser reads DJANGO_SUPERUSER_*; it refuses an existing name, so ask first.
      if python manage.py shell -v 0 -c 'import os, sys
from django.contrib.auth import get_user_model
sys.exit(0 if get_user_model().objects.filter(username=os.environ["DJANGO_SUPERUSER_USERNAME"]).exists() else 1)'; then
        echo "administrator ${DJANGO_SUPERUSER_USERNAME} exists"
      else
        python manage.py createsuperuser --noinput  # with DJANGO_SUPERUSER_EMAIL
      fi
    fi
    ;;
  *)
    exec "$@"
    ;;
esac
