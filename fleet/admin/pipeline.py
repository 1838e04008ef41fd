"""The model pipeline in the admin: pipelines and their steps, variant pins."""

from django.contrib import admin

from fleet.admin.base import ReadOnlyAdmin, ReadOnlyInline, ServiceErrorsMixin, _adopt
from fleet.models import (
    Pipeline,
    PipelineStep,
    VariantPin,
)
from fleet.services import registry


class PipelineStepInline(ReadOnlyInline):
    model = PipelineStep
    show_change_link = False
    fields = readonly_fields = (
        "kind",
        "state",
        "progress",
        "artifact",
        "error",
        "started_at",
        "finished_at",
    )


@admin.register(Pipeline)
class PipelineAdmin(ReadOnlyAdmin):
    """Optimization runs, started from a draft version's actions; their steps show progress."""

    list_display = ["__str__", "version", "state", "created_by", "created_at", "finished_at"]
    list_filter = ["state"]
    list_select_related = ["version__model", "created_by"]
    inlines = [PipelineStepInline]
    fields = readonly_fields = (
        "version",
        "source",
        "state",
        "options",
        "error",
        "created_by",
        "created_at",
        "started_at",
        "finished_at",
    )


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
