"""What devices and services record: deployments, heartbeats, the audit log. Read-only."""

from django.contrib import admin

from fleet.admin.base import ReadOnlyAdmin
from fleet.lib import humanize
from fleet.models import (
    AuditEvent,
    Deployment,
    Heartbeat,
)


@admin.register(Deployment)
class DeploymentAdmin(ReadOnlyAdmin):
    list_display = ["id", "device", "version", "state", "downloaded", "created_by", "updated_at"]
    list_filter = ["state", ("version__model", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["device__device_id", "artifact__sha256"]
    list_select_related = ["device", "version__model", "created_by"]

    @admin.display(description="downloaded")
    def downloaded(self, deployment):
        return f"{humanize.size(deployment.bytes_done)} of {humanize.size(deployment.bytes_total)}"


@admin.register(Heartbeat)
class HeartbeatAdmin(ReadOnlyAdmin):
    list_display = ["device", "received_at", "seq", "cpu_percent", "requests", "errors", "p50_ms", "p95_ms"]
    search_fields = ["device__device_id"]
    list_select_related = ["device"]
    # Counting every heartbeat of the fleet on each page load would be the slowest query here.
    show_full_result_count = False


@admin.register(AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """The audit log: nobody edits it, superusers included."""

    list_display = ["created_at", "actor_label", "action", "object_type", "object_id", "object_repr"]
    list_filter = ["action", "object_type"]
    search_fields = ["actor_label", "object_id", "object_repr", "reason"]
    date_hierarchy = "created_at"
