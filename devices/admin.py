"""Django admin for devices and their stored telemetry (CONTRACT §5 `/admin/`)."""

from django.contrib import admin

from devices.models import Device, Reading


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    """Devices: who is online, when each was last seen, latest metrics."""

    list_display = ("id", "name", "transport", "online", "last_seen")
    list_filter = ("online", "transport")
    search_fields = ("id", "name")
    readonly_fields = ("created",)
    ordering = ("id",)


@admin.register(Reading)
class ReadingAdmin(admin.ModelAdmin):
    """Stored readings; the table grows fast, so no full counts and a raw id device field."""

    list_display = ("device", "metric", "ts", "value")
    list_filter = ("metric", ("device", admin.RelatedOnlyFieldListFilter))
    search_fields = ("device__id", "metric")
    date_hierarchy = "ts"
    raw_id_fields = ("device",)
    list_select_related = ("device",)
    ordering = ("-id",)  # insertion order: the primary key, no full sort of a big table
    show_full_result_count = False
