"""The registry in the admin: models, aliases, versions, artifacts, tags."""

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import Count
from django.template.defaultfilters import filesizeformat
from django.urls import reverse
from django.utils.html import format_html

from fleet.admin.base import ReadOnlyAdmin, ReadOnlyInline, ServiceErrorsMixin, _adopt
from fleet.choices import VersionStatus
from fleet.errors import ServiceError
from fleet.lib import humanize
from fleet.models import (
    Alias,
    AliasMove,
    Artifact,
    Model,
    ModelVersion,
    Tag,
    VariantEvaluation,
)
from fleet.services import aliases, pipeline, registry, retention


class AliasInline(ReadOnlyInline):
    """A model's aliases; move one from its own page (Aliases), where its history is."""

    model = Alias
    fields = readonly_fields = (
        "name",
        "version",
        "updated_at",
        "history",
    )

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
        return model.version_count  # type: ignore[attr-defined]  # annotated by get_queryset

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
    fields = readonly_fields = (
        "filename",
        "role",
        "precision",
        "hardware_class",
        "status",
        "quality",
        "file_size",
        "digest",
        "error",
    )

    def get_queryset(self, request):
        return super().get_queryset(request).defer("chunk_hashes", "chunk_lengths")

    # Human units, and the digest shortened (whole on hover): 64 hex digits pushed the table off the page.
    @admin.display(description="size")
    def file_size(self, artifact):
        return humanize.size(artifact.size)

    @admin.display(description="sha256")
    def digest(self, artifact):
        return (
            format_html('<span title="{}">{}…</span>', artifact.sha256, artifact.sha256[:12]) if artifact.sha256 else ""
        )


class AliasMoveInline(ReadOnlyInline):
    model = AliasMove
    fields = readonly_fields = (
        "moved_at",
        "from_label",
        "to_label",
        "actor_label",
        "reason",
    )


class MoveAliasForm(forms.ModelForm):
    reason = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}), help_text="Kept in the history.")

    class Meta:
        model = Alias
        fields = ["model", "name", "version"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # A viewer's page is read-only: the admin builds this form without any field.
        if "version" in self.fields:
            self.fields["version"].queryset = ModelVersion.objects.filter(
                status=VersionStatus.PUBLISHED
            ).select_related("model")
        if self.instance.pk:
            for name in ("model", "name"):
                if name in self.fields:
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
        return version.artifact_count  # type: ignore[attr-defined]  # annotated by get_queryset

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
            except ServiceError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Published {version.label}.", messages.SUCCESS)

    @admin.action(description="Archive the selected versions (never offered again; files kept)", permissions=["change"])
    def archive(self, request, queryset):
        for version in queryset.select_related("model"):
            try:
                retention.archive_version(version, actor=request.user, reason="archived in the admin")
            except ServiceError as exc:
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
            except ServiceError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"Deleted {label}.", messages.SUCCESS)

    @admin.action(description="Build int8, int4 and fp16 variants and evaluate them", permissions=["change"])
    def optimize(self, request, queryset):
        for version in queryset.select_related("model"):
            try:
                started = pipeline.start_pipeline(version, actor=request.user)
            except ServiceError as exc:
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
    fields = readonly_fields = (
        "accepted",
        "mean_cosine",
        "min_cosine",
        "max_abs_error",
        "token_agreement",
        "perplexity",
        "decode_tokens_per_s",
        "ttft_ms",
        "details",
        "threshold",
        "latency_median_ms",
        "latency_p95_ms",
        "peak_memory_bytes",
        "samples",
        "evaluation_set",
        "created_at",
    )


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
        return (
            queryset
            if request.resolver_match.url_name.endswith("_change")
            else queryset.defer("chunk_hashes", "chunk_lengths")
        )

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
        return tag.device_count  # type: ignore[attr-defined]  # annotated by get_queryset
