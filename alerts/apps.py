"""Alerts: rules over devices' telemetry and presence, and the alerts they raise."""

from django.apps import AppConfig


class AlertsConfig(AppConfig):
    name = "alerts"
    verbose_name = "Alerts"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        """Hook the evaluator into the telemetry pipeline; reload rules when they change."""
        from alerts import hooks, signals  # noqa: F401  (signal receivers)
        from devices.telemetry import pipeline

        pipeline.add_observer(hooks.observe_reading, hooks.observe_status)
