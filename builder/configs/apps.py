from django.apps import AppConfig


class ConfigsConfig(AppConfig):
    """Model configurations: saved specs with versions, presets, the wizard, the JSON editor, comparison."""

    name = "builder.configs"
    label = "configs"

    def ready(self) -> None:
        from builder.configs import work  # noqa: F401  (registers hardware calibrations as durable work)
