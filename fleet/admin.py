"""The operator's admin. Every write goes through a service, so it is checked and audited."""

from datetime import timedelta

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Count
from django.forms.models import BaseInlineFormSet
from django.http import HttpResponseRedirect
from django.template.defaultfilters import filesizeformat
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from fleet.choices import VersionStatus
from fleet.models import (
    Alias,
    AliasMove,
    Artifact,
    AuditEvent,
    Deployment,
    Device,
    EnrollmentToken,
    Heartbeat,
    Model,
    ModelVersion,
    Pipeline,
    PipelineStep,
    Rollout,
    RolloutStage,
    Tag,
    VariantEvaluation,
    VariantPin,
    slug_validator,
)
from fleet.mqtt.dynsec import DynSecError
from fleet.services import aliases, deployments, devices, enrollment, pipeline, registry, retention, rollouts
from fleet.services.deployments import DeploymentError
from fleet.services.registry import ArtifactRejected, RegistryError
from fleet.services.rollouts import RolloutError
from fleet.storage import TooLarge

RECENT_ROWS = 10


def _adopt(obj: models.Model, saved: models.Model) -> None:
    """Let the admin carry on (log, redirect) with the row a service saved in ``obj``'s place."""
    for field in obj._meta.concrete_fields:
        setattr(obj, field.attname, getattr(saved, field.attname))
    obj._state.adding = False


class ServiceErrorsMixin:
    """A service that refuses a change shows its reason instead of a server error."""

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        try:
            return super().changeform_view(request, object_id, form_url, extra_context)
        except (RegistryError, DeploymentError, TooLarge, ArtifactRejected, aliases.AliasError) as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(request.get_full_path())


class ReadOnlyAdmin(admin.ModelAdmin):
    """State that devices and services write: the admin shows it and never edits it."""

    def has_add_permission(self, request) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False


class RecentFormSet(BaseInlineFormSet):
    """Only the newest rows: a device has thousands of heartbeats."""

    def get_queryset(self):
        if not hasattr(self, "_recent"):
            self._recent = super().get_queryset()[:RECENT_ROWS]
        return self._recent


# --- Registry --------------------------------------------------------------------


class AliasInline(ReadOnlyInline):
    """A model's aliases; move one from its own page (Aliases), where its history is."""

    model = Alias
    fields = ["name", "version", "updated_at", "history"]
    readonly_fields = fields

    @admin.display(description="history")
    def history(self, alias: Alias):
        url = reverse("admin:fleet_alias_change", args=[alias.pk])
        return format_html('<a href="{}">{} move(s)</a>', url, alias.moves.count())


@admin.register(Model)
class RegistryModelAdmin(admin.ModelAdmin):
    """Models are created here; their names never change, as version labels carry them."""

    list_display = ["name", "description", "version_count", "created_at"]
    search_fields = ["name", "description"]
    fields = ["name", "description", "created_at"]
    readonly_fields = ["created_at"]
    inlines = [AliasInline]

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(version_count=Count("versions"))

    @admin.display(ordering="version_count")
    def version_count(self, model: Model) -> int:
        return model.version_count

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        _adopt(obj, registry.create_model(name=data["name"], description=data["description"], actor=request.user))


class ArtifactInline(ReadOnlyInline):
    model = Artifact
    fk_name = "version"
    fields = ["filename", "role", "precision", "hardware_class", "status", "quality", "size", "sha256", "error"]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).defer("chunk_hashes")


class AliasMoveInline(ReadOnlyInline):
    model = AliasMove
    fields = ["moved_at", "from_label", "to_label", "actor_label", "reason"]
    readonly_fields = fields


class MoveAliasForm(forms.ModelForm):
    reason = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}), help_text="Kept in the history.")

    class Meta:
        model = Alias
        fields = ["model", "name", "version"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["version"].queryset = ModelVersion.objects.filter(status=VersionStatus.PUBLISHED).select_related(
            "model"
        )
        if self.instance.pk:
            for name in ("model", "name"):
                self.fields[name].disabled = True

    def validate_unique(self):
        pass  # moving an alias that exists is the point; the service finds it


@admin.register(Alias)
class AliasAdmin(ServiceErrorsMixin, admin.ModelAdmin):
    """Create an alias, or move one to another published version; every move is kept below."""

    form = MoveAliasForm
    list_display = ["__str__", "version", "updated_at"]
    list_select_related = ["model", "version__model"]
    list_filter = ["model"]
    inlines = [AliasMoveInline]

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        model = obj.model if change else data["model"]
        name = obj.name if change else data["name"]
        _adopt(obj, aliases.move_alias(model, name, data["version"], actor=request.user, reason=data["reason"]))


@admin.register(ModelVersion)
class ModelVersionAdmin(ServiceErrorsMixin, admin.ModelAdmin):
    """Drafts take new artifacts and notes; a published version is read-only."""

    list_display = ["__str__", "model", "number", "status", "task", "artifact_count", "created_by", "published_at"]
    list_filter = ["status", "task", "model"]
    search_fields = ["model__name", "notes"]
    list_select_related = ["model", "created_by"]
    autocomplete_fields = ["model"]
    raw_id_fields = ["parent"]
    inlines = [ArtifactInline]
    actions = ["publish", "optimize", "archive", "delete_unused"]
    add_fields = ["model", "parent", "notes", "task", "pooling", "normalize", "max_length"]
    change_fields = [
        "model",
        "number",
        "status",
        "notes",
        "parent",
        "task",
        "pooling",
        "normalize",
        "max_length",
        "quality_threshold",
        "breaking",
        "tag_list",
        "created_by",
        "created_at",
        "published_at",
    ]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(artifact_count=Count("artifacts"))

    @admin.display(description="tags")
    def tag_list(self, version: ModelVersion) -> str:
        # Set through the API (PUT /api/v1/versions/{id}/tags/), which audits them.
        return ", ".join(str(tag) for tag in version.tags.all()) or "-"

    @admin.display(ordering="artifact_count")
    def artifact_count(self, version: ModelVersion) -> int:
        return version.artifact_count

    def get_fields(self, request, obj=None):
        return self.add_fields if obj is None else self.change_fields

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        return [f for f in self.change_fields if f != "notes"]

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []

    def has_change_permission(self, request, obj=None) -> bool:
        if obj is not None and obj.is_published:
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        if change:
            if "notes" in form.changed_data:
                _adopt(obj, registry.update_version_notes(obj, notes=data["notes"], actor=request.user))
            return
        fields = {name: data[name] for name in self.add_fields if name not in ("model", "parent")}
        version = registry.create_version(data["model"], parent=data["parent"], actor=request.user, **fields)
        _adopt(obj, version)

    @admin.action(description="Publish the selected drafts", permissions=["change"])
    def publish(self, request, queryset):
        for version in queryset.select_related("model"):
            try:
                registry.publish_version(version, actor=request.user)
            except RegistryError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Published {version.label}.", messages.SUCCESS)

    @admin.action(description="Archive the selected versions (never offered again; files kept)", permissions=["change"])
    def archive(self, request, queryset):
        for version in queryset.select_related("model"):
            try:
                retention.archive_version(version, actor=request.user, reason="archived in the admin")
            except retention.RetentionRefused as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Archived {version.label}.", messages.SUCCESS)

    @admin.action(
        description="Delete the selected versions and their unshared files, if nothing needs them",
        permissions=["change"],
    )
    def delete_unused(self, request, queryset):
        for version in queryset.select_related("model"):
            label = version.label
            try:
                retention.delete_version(version, actor=request.user, reason="deleted in the admin")
            except retention.RetentionRefused as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Deleted {label}.", messages.SUCCESS)

    @admin.action(description="Build int8, int4 and fp16 variants and evaluate them", permissions=["change"])
    def optimize(self, request, queryset):
        for version in queryset.select_related("model"):
            try:
                started = pipeline.start_pipeline(version, actor=request.user)
            except RegistryError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Queued pipeline {started.pk} for {version.label}.", messages.SUCCESS)


class ArtifactUploadForm(forms.ModelForm):
    """A new file for a draft version; the registry stores it and computes its hashes."""

    file = forms.FileField(help_text="The ONNX model or tokenizer file.")

    class Meta:
        model = Artifact
        fields = ["version", "file", "role", "precision", "hardware_class", "format"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["version"].queryset = ModelVersion.objects.filter(status=VersionStatus.DRAFT).select_related(
            "model"
        )
        self.fields["version"].help_text = "Only drafts take new files."

    def clean_file(self):
        file = self.cleaned_data["file"]
        if file.size > settings.ARTIFACT_MAX_BYTES:
            raise ValidationError(f"The file is over the {filesizeformat(settings.ARTIFACT_MAX_BYTES)} limit.")
        return file


class VariantEvaluationInline(ReadOnlyInline):
    """How the variant compares with fp32 on the version's evaluation set."""

    model = VariantEvaluation
    fk_name = "artifact"
    show_change_link = False
    fields = [
        "accepted",
        "mean_cosine",
        "min_cosine",
        "max_abs_error",
        "threshold",
        "latency_median_ms",
        "latency_p95_ms",
        "peak_memory_bytes",
        "samples",
        "evaluation_set",
        "created_at",
    ]
    readonly_fields = fields


@admin.register(Artifact)
class ArtifactAdmin(ServiceErrorsMixin, admin.ModelAdmin):
    """Files are uploaded here and never edited: a changed file is a new artifact."""

    list_display = [
        "__str__",
        "version",
        "role",
        "precision",
        "hardware_class",
        "status",
        "quality",
        "size_display",
        "sha256",
    ]
    list_filter = ["status", "quality", "role", "precision", "hardware_class"]
    inlines = [VariantEvaluationInline]
    search_fields = ["sha256", "filename", "version__model__name"]
    list_select_related = ["version__model"]
    add_form = ArtifactUploadForm
    add_fields = ["version", "file", "role", "precision", "hardware_class", "format"]

    def get_queryset(self, request):
        queryset = super().get_queryset(request)
        # The chunk list is long and only the change page shows it.
        return queryset if request.resolver_match.url_name.endswith("_change") else queryset.defer("chunk_hashes")

    @admin.display(description="size", ordering="size")
    def size_display(self, artifact: Artifact) -> str:
        return filesizeformat(artifact.size)

    def get_fields(self, request, obj=None):
        return self.add_fields if obj is None else super().get_fields(request, obj)

    def get_inlines(self, request, obj):
        return self.inlines if obj is not None else []

    def get_form(self, request, obj=None, **kwargs):
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, **kwargs)

    def has_change_permission(self, request, obj=None) -> bool:
        return False

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        artifact = registry.add_artifact(
            data["version"],
            data["file"],
            filename=data["file"].name,
            actor=request.user,
            role=data["role"],
            precision=data["precision"],
            hardware_class=data["hardware_class"],
            format=data["format"],
        )
        _adopt(obj, artifact)


@admin.register(Tag)
class TagAdmin(ReadOnlyAdmin):
    """Tags come and go with the devices' tag lists, edited on each device."""

    list_display = ["name", "device_count"]
    search_fields = ["name"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(device_count=Count("devices"))

    @admin.display(ordering="device_count")
    def device_count(self, tag: Tag) -> int:
        return tag.device_count


# --- Devices ---------------------------------------------------------------------


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
    fields = ["version", "state", "bytes_done", "bytes_total", "error", "created_by", "created_at", "updated_at"]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("device", "version__model", "created_by").order_by("-id")


class HeartbeatInline(ReadOnlyInline):
    model = Heartbeat
    formset = RecentFormSet
    show_change_link = False
    verbose_name_plural = f"Last heartbeats (newest {RECENT_ROWS})"
    fields = ["received_at", "seq", "cpu_percent", "mem_rss_bytes", "requests", "errors", "p50_ms", "p95_ms"]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("device").order_by("-received_at")


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
    inlines = [DeploymentInline, HeartbeatInline]
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
                    "cpu_flags",
                    "ram_bytes",
                    "disk_free_bytes",
                    "providers",
                    "agent_version",
                ]
            },
        ),
    ]
    readonly_fields = [f for _, options in fieldsets for f in options["fields"] if f != "tag_names"]

    def get_queryset(self, request):
        return super().get_queryset(request).prefetch_related("tags")

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
                result = deployments.assign_version(
                    version,
                    queryset,
                    actor=request.user,
                    reason=form.cleaned_data["reason"],
                    source_address=request.META.get("REMOTE_ADDR"),
                )
            except DeploymentError as exc:
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
            except (enrollment.EnrollmentError, DynSecError) as exc:
                self.message_user(request, f"{device}: {exc}", messages.ERROR)
        self.message_user(request, f"{done} {changed} device(s).", messages.SUCCESS if changed else messages.WARNING)

    @admin.action(description="Accept the selected devices", permissions=["enroll"])
    def accept(self, request, queryset):
        self._verdict(request, queryset, enrollment.accept_device, "Accepted")

    @admin.action(description="Reject the selected devices", permissions=["enroll"])
    def reject(self, request, queryset):
        self._verdict(request, queryset, enrollment.reject_device, "Rejected")

    @admin.action(description="Decommission the selected devices (removes their broker logins)", permissions=["enroll"])
    def decommission(self, request, queryset):
        self._verdict(request, queryset, enrollment.decommission_device, "Decommissioned")

    def _report_assignment(self, request, version: ModelVersion, result: deployments.AssignmentResult) -> None:
        self.message_user(
            request,
            f"Assigned {version.label} to {len(result.deployments)} device(s); skipped {len(result.skipped)}.",
            messages.SUCCESS if result.deployments else messages.WARNING,
        )
        for device_id, why in list(result.skipped.items())[:RECENT_ROWS]:
            self.message_user(request, f"Skipped {device_id}: {why}", messages.WARNING)


# --- What devices and services record ---------------------------------------------


@admin.register(Deployment)
class DeploymentAdmin(ReadOnlyAdmin):
    list_display = ["id", "device", "version", "state", "bytes_done", "bytes_total", "created_by", "updated_at"]
    list_filter = ["state", ("version__model", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["device__device_id", "artifact__sha256"]
    list_select_related = ["device", "version__model", "created_by"]


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


# --- Model pipeline --------------------------------------------------------------------


class PipelineStepInline(ReadOnlyInline):
    model = PipelineStep
    show_change_link = False
    fields = ["kind", "state", "artifact", "error", "started_at", "finished_at"]
    readonly_fields = fields


@admin.register(Pipeline)
class PipelineAdmin(ReadOnlyAdmin):
    """Optimization runs, started from a draft version's actions; their steps show progress."""

    list_display = ["__str__", "version", "state", "created_by", "created_at", "finished_at"]
    list_filter = ["state"]
    list_select_related = ["version__model", "created_by"]
    inlines = [PipelineStepInline]
    fields = ["version", "source", "state", "options", "error", "created_by", "created_at", "started_at", "finished_at"]
    readonly_fields = fields


@admin.register(VariantPin)
class VariantPinAdmin(ServiceErrorsMixin, admin.ModelAdmin):
    """An operator's choice of variant for one device or a tag; added and removed, never edited."""

    list_display = ["__str__", "version", "artifact", "device", "tag", "created_by", "created_at"]
    list_select_related = ["version__model", "artifact", "device", "tag", "created_by"]
    raw_id_fields = ["artifact", "device"]
    fields = ["artifact", "device", "tag", "reason"]

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        pin = registry.pin_variant(
            data["artifact"], device=data["device"], tag=data["tag"], reason=data["reason"], actor=request.user
        )
        _adopt(obj, pin)

    def delete_model(self, request, obj):
        registry.unpin_variant(obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for pin in queryset:
            registry.unpin_variant(pin, actor=request.user)


# --- Rollouts ----------------------------------------------------------------------


class RolloutStageInline(ReadOnlyInline):
    model = RolloutStage
    show_change_link = False
    fields = [
        "index",
        "name",
        "size_label",
        "min_soak_seconds",
        "success_percent",
        "failure_percent",
        "failure_min_finished",
        "health_p95_ratio",
        "health_error_points",
        "health_min_samples",
        "started_at",
        "passed_at",
    ]
    readonly_fields = fields

    @admin.display(description="size (cumulative)")
    def size_label(self, stage: RolloutStage) -> str:
        return stage.size_label


@admin.register(Rollout)
class RolloutAdmin(ReadOnlyAdmin):
    """Rollouts are created through the API; here operators watch them and, with the release permission, act."""

    list_display = ["__str__", "version", "state", "stage_display", "started_at", "finished_at", "created_by"]
    list_filter = ["state", ("version__model", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["name", "version__model__name", "reason"]
    list_select_related = ["version__model", "created_by"]
    inlines = [RolloutStageInline]
    actions = ["start", "pause", "resume", "promote", "abort", "rollback"]
    fields = [
        "name",
        "version",
        "state",
        "reason",
        "selector",
        "baseline",
        "max_per_minute",
        "current_stage",
        "stage_started_at",
        "soak_skipped",
        "progress",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    ]
    readonly_fields = fields

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(stage_count=Count("stages"))

    def has_change_permission(self, request, obj=None) -> bool:
        # The change page is read-only, but it must open to show the progress.
        return False

    def has_release_permission(self, request) -> bool:
        return request.user.has_perm("fleet.release_rollout")

    @admin.display(description="stage")
    def stage_display(self, rollout: Rollout) -> str:
        return f"{rollout.current_stage + 1} of {rollout.stage_count}"

    @admin.display(description="selector")
    def selector(self, rollout: Rollout) -> str:
        parts = []
        if rollout.selector_tags:
            parts.append(f"tags: {', '.join(rollout.selector_tags)}")
        if rollout.selector_device_ids:
            parts.append(f"devices: {', '.join(rollout.selector_device_ids)}")
        if rollout.selector_hardware_class:
            parts.append(f"hardware class: {rollout.selector_hardware_class}")
        return "; ".join(parts)

    @admin.display(description="progress and gates")
    def progress(self, rollout: Rollout) -> str:
        report = rollouts.rollout_progress(rollout)
        columns = ["targeted", "pending", "downloading", "verifying", "active", "failed", "rolled_back", "ineligible"]
        rows = []
        for item in report["stages"]:
            counts = item["progress"].counts
            gates = format_html_join(
                mark_safe("<br>"),
                "{}: <b>{}</b> ({} vs {}) — {}",
                ((g.gate, g.verdict, g.value, g.threshold, g.detail) for g in item["progress"].gates),
            )
            cells = format_html_join("", "<td>{}</td>", ((getattr(counts, c),) for c in columns))
            rows.append(
                format_html("<tr><td>{} ({})</td>{}<td>{}</td></tr>", item["stage"], item["status"], cells, gates)
            )
        header = format_html_join("", "<th>{}</th>", ((c.replace("_", " "),) for c in ["stage", *columns, "gates"]))
        return format_html("<table><tr>{}</tr>{}</table>", header, mark_safe("".join(rows)))

    def _act(self, request, queryset, service, done: str) -> None:
        for rollout in queryset:
            try:
                service(rollout, actor=request.user)
            except RolloutError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"{done} {rollout}.", messages.SUCCESS)

    @admin.action(description="Start the selected drafts", permissions=["release"])
    def start(self, request, queryset):
        self._act(request, queryset, rollouts.start_rollout, "Started")

    @admin.action(description="Pause the selected rollouts", permissions=["release"])
    def pause(self, request, queryset):
        self._act(request, queryset, rollouts.pause_rollout, "Paused")

    @admin.action(description="Resume the selected rollouts", permissions=["release"])
    def resume(self, request, queryset):
        self._act(request, queryset, rollouts.resume_rollout, "Resumed")

    @admin.action(description="Promote: skip the rest of the current stage's soak", permissions=["release"])
    def promote(self, request, queryset):
        self._act(request, queryset, rollouts.promote_rollout, "Promoted")

    @admin.action(description="Abort the selected rollouts", permissions=["release"])
    def abort(self, request, queryset):
        self._act(request, queryset, rollouts.abort_rollout, "Aborted")

    @admin.action(description="Roll back: devices go back to their previous version", permissions=["release"])
    def rollback(self, request, queryset):
        self._act(request, queryset, rollouts.rollback_rollout, "Rolled back")


# --- Enrollment --------------------------------------------------------------------------


class EnrollmentTokenForm(forms.ModelForm):
    expires_in_hours = forms.IntegerField(min_value=1, max_value=24 * 365, initial=24)

    class Meta:
        model = EnrollmentToken
        fields = ["name", "auto_approve", "max_devices"]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    """Tokens are created here and shown once; afterwards only their prefix is known."""

    form = EnrollmentTokenForm
    list_display = ["name", "prefix", "auto_approve", "max_devices", "expires_at", "revoked_at", "created_by"]
    list_filter = ["auto_approve"]
    readonly_fields = ["prefix", "expires_at", "revoked_at", "created_by", "created_at"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        if obj is None:
            return ["name", "auto_approve", "max_devices", "expires_in_hours"]
        return ["name", "auto_approve", "max_devices", *self.readonly_fields]

    def has_change_permission(self, request, obj=None) -> bool:
        return obj is None and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None) -> bool:
        return False

    def save_model(self, request, obj, form, change):
        data = form.cleaned_data
        token, secret = enrollment.create_token(
            name=data["name"],
            expires_in=timedelta(hours=data["expires_in_hours"]),
            auto_approve=data["auto_approve"],
            max_devices=data["max_devices"],
            actor=request.user,
        )
        _adopt(obj, token)
        self.message_user(request, f"The token, shown this once: {secret}", messages.WARNING)

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        for token in queryset:
            enrollment.revoke_token(token, actor=request.user)
        self.message_user(request, f"Revoked {queryset.count()} token(s).", messages.SUCCESS)
