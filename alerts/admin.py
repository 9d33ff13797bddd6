"""Django admin for alert rules (editable) and alerts with their audit trail (read-only)."""

from django.contrib import admin

from alerts.models import Alert, AlertEvent, AlertRule


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    """Rules; saving or deleting one reloads the evaluators (alerts/signals.py)."""

    list_display = (
        "name",
        "device",
        "metric",
        "op",
        "threshold",
        "for_seconds",
        "severity",
        "enabled",
    )
    list_filter = ("op", "severity", "enabled")
    search_fields = ("name", "device", "metric")
    readonly_fields = ("created_by", "created_at", "updated_at")

    def save_model(self, request, obj, form, change):  # noqa: D102
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


class AlertEventInline(admin.TabularInline):
    model = AlertEvent
    extra = 0
    can_delete = False
    readonly_fields = ("kind", "at", "value", "user", "note")

    def has_add_permission(self, request, obj=None):  # noqa: D102
        return False


@admin.register(Alert)
class AlertAdmin(admin.ModelAdmin):
    """Alerts and every transition of each; the evaluator and the API change them, not this."""

    list_display = (
        "id",
        "rule",
        "device",
        "state",
        "value",
        "raised_at",
        "cleared_at",
        "acknowledged",
    )
    list_filter = ("state", "acknowledged", "rule__severity")
    search_fields = ("device", "rule__name")
    list_select_related = ("rule",)
    inlines = [AlertEventInline]

    def has_add_permission(self, request):  # noqa: D102
        return False

    def has_change_permission(self, request, obj=None):  # noqa: D102
        return False
