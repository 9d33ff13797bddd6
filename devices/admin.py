"""Django admin for devices, their telemetry and commands (docs/interface.md §5.1 `/admin/`)."""

from django.contrib import admin
from django.urls import path
from django.utils.html import format_html_join
from django.utils.safestring import mark_safe

from devices.conventions.discovery.consumer import device_entities
from devices.models import Command, Device, Reading


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    """Devices: who is online, when each was last seen, latest metrics, rejected messages."""

    list_display = ("id", "name", "transport", "online", "last_seen", "rejected")
    list_filter = ("online", "transport")
    search_fields = ("id", "name")
    # The rejection record is the telemetry pipeline's to add up (docs/interface.md §5.2).
    readonly_fields = (
        "created",
        "discovered_entities",
        "rejected",
        "last_rejected_at",
        "last_rejection_reason",
        "last_rejection",
    )
    ordering = ("id",)

    @admin.display(description="discovered entities")
    def discovered_entities(self, obj: Device) -> str:
        """A self-describing device's entities (docs/conventions.md), unsupported ones with
        the reason; as this process's MQTT bridge knows them."""
        rows = [
            (
                e["name"],
                e["metric"],
                e["component"],
                f" [{e['unit']}]" if e["unit"] else "",
                f" — unsupported: {e['unsupported']}" if e["unsupported"] else "",
            )
            for e in device_entities(obj.id)
        ]
        if not rows:
            return "—"
        return format_html_join(mark_safe("<br>"), "{} ({}, {}){}{}", rows)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows are looked at here, never added, changed or deleted."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ReadingAdmin(ReadOnlyAdmin):
    """Stored readings, list only: the table grows fast, so no full counts; ordered as the key
    (newest first within a series), so a page needs no sort of the whole table.

    A reading is keyed by (device, metric, ts), and Django 5.2's admin has no change, delete
    or history URLs for a composite key (`AdminSite.register` refuses such a model), so this
    admin serves the list alone, without links or actions, and is registered below.
    """

    list_display = ("device", "metric", "ts", "value")
    list_filter = ("metric", ("device", admin.RelatedOnlyFieldListFilter))
    search_fields = ("device__id", "metric")
    date_hierarchy = "ts"
    list_select_related = ("device",)
    list_display_links = None
    actions = None
    ordering = ("device", "metric", "-ts")
    show_full_result_count = False

    def get_urls(self) -> list:
        name = f"{self.opts.app_label}_{self.opts.model_name}_changelist"
        return [path("", self.admin_site.admin_view(self.changelist_view), name=name)]


# What `admin.site.register` does, less its refusal of a composite primary key (see above).
admin.site._registry[Reading] = ReadingAdmin(Reading, admin.site)


@admin.register(Command)
class CommandAdmin(ReadOnlyAdmin):
    """The command audit trail: who commanded what, when, and how it ended; read-only.

    Commands are created through the dashboard or the API (permission, rate limit, delivery),
    never here; rows are never edited or deleted from the admin, so the trail stays whole.
    """

    list_display = (
        "created_at",
        "device",
        "name",
        "args",
        "status",
        "created_by",
        "sent_at",
        "finished_at",
    )
    list_filter = (
        "status",
        "name",
        "created_at",
        ("created_by", admin.RelatedOnlyFieldListFilter),
        ("device", admin.RelatedOnlyFieldListFilter),
    )
    search_fields = ("id", "device__id", "name", "created_by__username", "error")
    date_hierarchy = "created_at"
    list_select_related = ("device", "created_by")
    ordering = ("-created_at",)
    fields = (
        "id",
        "device",
        "name",
        "args",
        "status",
        "result",
        "error",
        "created_by",
        "created_at",
        "sent_at",
        "finished_at",
        "timeout",
        "expires_at",
    )
    readonly_fields = fields
    show_full_result_count = False
