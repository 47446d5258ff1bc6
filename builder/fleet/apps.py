from django.apps import AppConfig


class FleetConfig(AppConfig):
    """The workers: hardware classes, the live registry of Celery workers (hardware, current job, heartbeat) and
    its page."""

    name = "builder.fleet"
    label = "fleet"

    def ready(self) -> None:
        from builder.core.health import register_section
        from builder.core.profiles import register_cpu_workers_source
        from builder.fleet.registry import advertised_workers, live_cpu_workers

        register_section("workers", advertised_workers)
        register_cpu_workers_source(live_cpu_workers)
