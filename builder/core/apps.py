from django.apps import AppConfig


class CoreConfig(AppConfig):
    """Home, navigation, health checks and the status page."""

    name = "builder.core"
    label = "core"
