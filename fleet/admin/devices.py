"""Devices in the admin: tags, recent deployments and heartbeats, assigning a version."""

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.template.response import TemplateResponse

from fleet.admin.base import RECENT_ROWS, ReadOnlyInline, RecentFormSet
from fleet.choices import VersionStatus
from fleet.errors import ServiceError
from fleet.http import request_address
from fleet.lib import hardware, humanize
from fleet.models import (
    Deployment,
    Device,
    Heartbeat,
    HeartbeatRollup,
    ModelVersion,
    slug_validator,
)
from fleet.services import assignments, devices, enrollment


class DeviceTagsForm(forms.ModelForm):
    """A device's tags as one comma-separated line: new names create new tags."""

    tag_names = forms.CharField(
        label="Tags", required=False, help_text="Comma-separated, e.g. “lab, floor-2”.", max_length=2000
    )

    class Meta:
        model = Device
        fields = ["tag_names"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.fields["tag_names"].initial = ", ".join(tag.name for tag in self.instance.tags.all())

    def clean_tag_names(self) -> list[str]:
        names = sorted({name.strip() for name in self.cleaned_data["tag_names"].split(",") if name.strip()})
        for name in names:
            try:
                slug_validator(name)
            except ValidationError:
                raise ValidationError(f"“{name}”: {slug_validator.message}") from None
        return names


class AssignVersionForm(forms.Form):
    version = forms.ModelChoiceField(
        queryset=ModelVersion.objects.filter(status=VersionStatus.PUBLISHED).select_related("model"),
        help_text="Only published versions can go to devices.",
    )
    reason = forms.CharField(required=False, max_length=500, help_text="Kept in the audit log.")


class DeploymentInline(ReadOnlyInline):
    model = Deployment
    formset = RecentFormSet
    verbose_name_plural = f"Recent deployments (newest {RECENT_ROWS})"
    fields = readonly_fields = (
        "version",
        "state",
        "downloaded",
        "error",
        "created_by",
        "created_at",
        "updated_at",
    )

    @admin.display(description="downloaded")
    def downloaded(self, deployment):
        return f"{humanize.size(deployment.bytes_done)} of {humanize.size(deployment.bytes_total)}"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("device", "version__model", "created_by").order_by("-id")


class HeartbeatInline(ReadOnlyInline):
    model = Heartbeat
    formset = RecentFormSet
    show_change_link = False
    verbose_name_plural = f"Last heartbeats (newest {RECENT_ROWS})"
    fields = readonly_fields = (
        "received_at",
        "seq",
        "cpu_percent",
        "memory",
        "requests",
        "errors",
        "p50_ms",
        "p95_ms",
    )

    @admin.display(description="agent memory")
    def memory(self, beat):
        return humanize.size(beat.mem_rss_bytes)

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("device").order_by("-received_at")


class HeartbeatRollupInline(ReadOnlyInline):
    model = HeartbeatRollup
    formset = RecentFormSet
    show_change_link = False
    verbose_name_plural = f"Hour by hour (newest {RECENT_ROWS} hours; kept longer than the heartbeats)"
    fields = readonly_fields = (
        "hour", "heartbeats", "requests", "errors", "p50_ms", "p95_ms", "p99_ms", "max_ms", "cpu_percent",
    )  # fmt: skip

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("device").order_by("-hour")


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    """Devices register themselves; an operator tags them and assigns them versions."""

    form = DeviceTagsForm
    list_display = ["device_id", "name", "online", "hardware_class", "current_version", "tag_list", "last_seen"]
    list_filter = [
        "online",
        "enrollment",
        "hardware_class",
        "tags",
        "arch",
        "os",
        ("current_version__model", admin.RelatedOnlyFieldListFilter),
    ]
    search_fields = ["device_id", "name", "cpu_model"]
    list_select_related = ["current_version__model"]
    actions = ["assign_version", "accept", "reject", "decommission"]
    inlines = [DeploymentInline, HeartbeatRollupInline, HeartbeatInline]
    fieldsets = [
        (None, {"fields": ["device_id", "name", "tag_names"]}),
        ("Status", {"fields": ["online", "first_seen", "last_seen", "current_version", "current_artifact"]}),
        ("Enrollment", {"fields": ["enrollment", "enrollment_token", "public_key"]}),
        (
            "Hardware",
            {
                "fields": [
                    "hardware_class",
                    "arch",
                    "os",
                    "os_release",
                    "cpu_model",
                    "cpu_count",
                    "cpu_features",
                    "memory",
                    "free_disk",
                    "providers",
                    "agent_version",
                ]
            },
        ),
    ]
    readonly_fields = [
        f for _, options in fieldsets for f in options["fields"] if isinstance(f, str) and f != "tag_names"
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("tags")

    # Hardware in human units and a summary of the CPU flags, not a wall of them.
    @admin.display(description="CPU features")
    def cpu_features(self, device):
        return hardware.cpu_features(device.cpu_flags or [])

    @admin.display(description="memory")
    def memory(self, device):
        return humanize.size(device.ram_bytes)

    @admin.display(description="free disk")
    def free_disk(self, device):
        return humanize.size(device.disk_free_bytes)

    @admin.display(description="tags")
    def tag_list(self, device: Device) -> str:
        return ", ".join(tag.name for tag in device.tags.all())

    def has_add_permission(self, request) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def has_assign_permission(self, request) -> bool:
        return request.user.has_perm("fleet.add_deployment")

    def save_model(self, request, obj, form, change):
        # Every field but the tags is the device's own report: nothing to save here.
        pass

    def save_related(self, request, form, formsets, change):
        # The tags go through the service, so the change is audited; form.save_m2m() is never called.
        if "tag_names" in form.changed_data:
            devices.set_tags(form.instance, form.cleaned_data["tag_names"], actor=request.user)
        for formset in formsets:
            # The inlines are view-only: this saves nothing, but the change message reads its results.
            self.save_formset(request, form, formset, change=change)

    @admin.action(description="Assign a published version…", permissions=["assign"])
    def assign_version(self, request, queryset):
        form = AssignVersionForm(request.POST if "apply" in request.POST else None)
        if form.is_bound and form.is_valid():
            version = form.cleaned_data["version"]
            try:
                result = assignments.assign_version(
                    version,
                    queryset,
                    actor=request.user,
                    reason=form.cleaned_data["reason"],
                    source_address=request_address(request),
                )
            except ServiceError as exc:
                self.message_user(request, str(exc), messages.ERROR)
                return None
            self._report_assignment(request, version, result)
            return None
        context = {
            **self.admin_site.each_context(request),
            "title": "Assign a published version",
            "opts": self.model._meta,
            "form": form,
            "devices": queryset,
            "device_count": queryset.count(),
            # Post the selection back as it came, so "select all N" keeps meaning all N.
            "selected_ids": request.POST.getlist(helpers.ACTION_CHECKBOX_NAME),
            "select_across": request.POST.get("select_across", "0"),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "media": self.media,
        }
        return TemplateResponse(request, "admin/fleet/device/assign_version.html", context)

    def has_enroll_permission(self, request) -> bool:
        return request.user.has_perm("fleet.change_device")

    def _verdict(self, request, queryset, service, done: str) -> None:
        changed = 0
        for device in queryset:
            try:
                service(device, actor=request.user)
                changed += 1
            except ServiceError as exc:
                self.message_user(request, f"{device}: {exc}", messages.ERROR)
        level = messages.SUCCESS if changed else messages.WARNING
        self.message_user(request, f"{done} {humanize.plural(changed, 'device')}.", level)

    @admin.action(description="Accept the selected devices", permissions=["enroll"])
    def accept(self, request, queryset):
        self._verdict(request, queryset, enrollment.accept_device, "Accepted")

    @admin.action(description="Reject the selected devices", permissions=["enroll"])
    def reject(self, request, queryset):
        self._verdict(request, queryset, enrollment.reject_device, "Rejected")

    @admin.action(description="Decommission the selected devices (removes their broker logins)", permissions=["enroll"])
    def decommission(self, request, queryset):
        self._verdict(request, queryset, enrollment.decommission_device, "Decommissioned")

    def _report_assignment(self, request, version: ModelVersion, result: assignments.AssignmentResult) -> None:
        self.message_user(
            request,
            f"Assigned {version.label} to {humanize.plural(len(result.deployments), 'device')}; "
            f"skipped {len(result.skipped)}.",
            messages.SUCCESS if result.deployments else messages.WARNING,
        )
        for device_id, why in list(result.skipped.items())[:RECENT_ROWS]:
            self.message_user(request, f"Skipped {device_id}: {why}", messages.WARNING)
