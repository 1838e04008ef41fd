"""Rollouts in the admin: stages, gate values, transitions for release managers."""

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Count
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from fleet.admin.base import ReadOnlyAdmin, ReadOnlyInline
from fleet.choices import HardwareClass, HoldAction, RolloutBaseline, VersionStatus
from fleet.errors import ServiceError
from fleet.models import (
    ModelVersion,
    Rollout,
    RolloutStage,
)
from fleet.services import rollouts
from fleet.services.stages import MAX_STAGES

# What the add page offers before an operator changes anything: a canary, a quarter, everyone.
DEFAULT_STAGES = [
    {"name": "canary", "percent": 5, "min_soak_seconds": 600},
    {"name": "quarter", "percent": 25, "min_soak_seconds": 600},
    {"name": "everyone", "percent": 100, "min_soak_seconds": 0},
]
STAGE_ROWS = 6


def _names(text: str) -> list[str]:
    return sorted({name for name in text.replace(",", " ").split() if name})


class RolloutCreateForm(forms.Form):
    """The add page's input. It only collects: the service checks the rules of rollouts and stages, and creates."""

    name = forms.CharField(required=False, max_length=200)
    # Any version is accepted here and the service refuses one that is not published, so a
    # version archived while the page was open gets the service's clear message, not "invalid choice".
    version = forms.IntegerField(widget=forms.Select, help_text="Only published versions can be rolled out.")
    tags = forms.CharField(required=False, max_length=2000, help_text="Devices carrying any of these tags.")
    devices = forms.CharField(
        required=False, widget=forms.Textarea(attrs={"rows": 2}), help_text="And/or device ids, comma-separated."
    )
    hardware_class = forms.ChoiceField(
        choices=[("", "All selected devices"), *HardwareClass.choices], required=False, label="Only hardware class"
    )
    baseline = forms.ChoiceField(choices=RolloutBaseline.choices, initial=RolloutBaseline.PREVIOUS_VERSION)
    max_per_minute = forms.IntegerField(initial=1000, help_text="New assignments in any 60 seconds.")
    start = forms.BooleanField(required=False, initial=True, label="Start it now")
    supersede = forms.BooleanField(
        required=False, help_text="On start, abort any running or paused rollout that has some of these devices."
    )
    reason = forms.CharField(required=False, max_length=2000, help_text="Kept in the audit log of the start.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        published = ModelVersion.objects.filter(status=VersionStatus.PUBLISHED).select_related("model")
        self.fields["version"].widget.choices = [("", "---------")] + [
            (v.pk, v.label) for v in published.order_by("model__name", "-number")
        ]

    def clean_version(self) -> ModelVersion:
        found = ModelVersion.objects.select_related("model").filter(pk=self.cleaned_data["version"]).first()
        if found is None:
            raise forms.ValidationError(f"Version {self.cleaned_data['version']} does not exist.")
        return found

    def service_arguments(self, stages: list[dict]) -> dict:
        """The form as ``rollouts.create_rollout``'s arguments."""
        data = self.cleaned_data
        return {
            "version": data["version"],
            "name": data["name"],
            "tags": _names(data["tags"]),
            "device_ids": _names(data["devices"]),
            "hardware_class": data["hardware_class"],
            "baseline": data["baseline"],
            "max_per_minute": data["max_per_minute"],
            "stages": stages,
        }


class StageForm(forms.Form):
    """One stage row; a row with no name and no size is left out."""

    name = forms.CharField(required=False, max_length=64)
    percent = forms.DecimalField(required=False, max_digits=5, decimal_places=2)
    device_count = forms.IntegerField(required=False, label="device count")
    min_soak_seconds = forms.IntegerField(initial=0, label="soak (s)")
    success_percent = forms.DecimalField(initial=100, max_digits=5, decimal_places=2, label="success %")
    failure_percent = forms.DecimalField(initial=0, max_digits=5, decimal_places=2, label="failure %")
    failure_min_finished = forms.IntegerField(initial=1, label="failure judged after")
    health_p95_ratio = forms.DecimalField(
        required=False, max_digits=6, decimal_places=3, label="health p95 ratio", help_text="Blank: health gate off."
    )
    health_error_points = forms.DecimalField(initial=1, max_digits=5, decimal_places=2, label="health error points")
    health_min_samples = forms.IntegerField(initial=100, label="health min samples")
    inconclusive_timeout = forms.IntegerField(initial=3600, label="hold deadline (s)")
    inconclusive_action = forms.ChoiceField(choices=HoldAction.choices, initial=HoldAction.HOLD, label="then")

    def stage(self) -> dict | None:
        data = self.cleaned_data
        if not data or (data["name"] == "" and data["percent"] is None and data["device_count"] is None):
            return None
        return {key: value for key, value in data.items() if value is not None}


StageFormSet = forms.formset_factory(StageForm, extra=0, max_num=MAX_STAGES)


def _messages(error: ValidationError) -> list[str]:
    """A refusal of the service as sentences, each under the field it is about ("selector: …").

    The stages' messages name their stage already ("stage 2 (quarter): percent: …").
    """
    if not hasattr(error, "error_dict"):
        return list(error.messages)
    return [
        message if field in (NON_FIELD_ERRORS, "stages") else f"{field}: {message}"
        for field, messages in error.message_dict.items()
        for message in messages
    ]


class RolloutStageInline(ReadOnlyInline):
    model = RolloutStage
    show_change_link = False
    fields = readonly_fields = (
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
    )

    @admin.display(description="size (cumulative)")
    def size_label(self, stage: RolloutStage) -> str:
        return stage.size_label


@admin.register(Rollout)
class RolloutAdmin(ReadOnlyAdmin):
    """Operators watch rollouts here; release managers create, start and steer them."""

    list_display = ["__str__", "version", "state", "stage_display", "started_at", "finished_at", "created_by"]
    list_filter = ["state", ("version__model", admin.RelatedOnlyFieldListFilter)]
    search_fields = ["name", "version__model__name", "reason"]
    list_select_related = ["version__model", "created_by"]
    inlines = [RolloutStageInline]
    actions = ["start", "pause", "resume", "promote", "abort", "rollback"]
    fields = readonly_fields = (
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
    )

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(stage_count=Count("stages"))

    def has_change_permission(self, request, obj=None) -> bool:
        # The change page is read-only, but it must open to show the progress.
        return False

    def has_release_permission(self, request) -> bool:
        return request.user.has_perm("fleet.release_rollout")

    def has_add_permission(self, request) -> bool:
        return request.user.has_perm("fleet.add_rollout")

    def add_view(self, request, form_url="", extra_context=None):
        """Create, and with the release permission start, a rollout: the same services as the API's."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        may_start = self.has_release_permission(request)
        posted = request.method == "POST"
        form = RolloutCreateForm(request.POST if posted else None, initial={"start": may_start})
        stages = StageFormSet(request.POST if posted else None, prefix="stages", initial=self._initial_stages())
        if posted and form.is_valid() and stages.is_valid():
            rollout = self._create(request, form, stages, may_start=may_start)
            if rollout is not None:
                return HttpResponseRedirect(reverse("admin:fleet_rollout_change", args=[rollout.pk]))
        context = {
            **self.admin_site.each_context(request),
            **(extra_context or {}),
            "title": "Add rollout",
            "opts": self.model._meta,
            "form": form,
            "stages": stages,
            "may_start": may_start,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/fleet/rollout/add.html", context)

    def _initial_stages(self) -> list[dict]:
        return DEFAULT_STAGES + [{} for _ in range(STAGE_ROWS - len(DEFAULT_STAGES))]

    def _create(self, request, form: RolloutCreateForm, stages, *, may_start: bool) -> Rollout | None:
        data = form.cleaned_data
        if data["start"] and not may_start:
            form.add_error(None, "Starting a rollout needs the release permission; create it as a draft.")
            return None
        rows = [stage for stage in (f.stage() for f in stages.forms) if stage is not None]
        try:
            # One transaction: a start that is refused (a conflict) leaves no draft behind,
            # and the operator resubmits the same form, e.g. with supersede.
            with transaction.atomic():
                rollout = rollouts.create_rollout(actor=request.user, **form.service_arguments(rows))
                if data["start"]:
                    rollout = rollouts.start_rollout(
                        rollout, actor=request.user, supersede=data["supersede"], reason=data["reason"]
                    )
        except (ServiceError, ValidationError) as exc:
            for message in _messages(exc) if isinstance(exc, ValidationError) else [str(exc)]:
                form.add_error(None, message)
            return None
        self.log_addition(request, rollout, [{"added": {}}])
        done = "Created and started" if data["start"] else "Created the draft"
        self.message_user(request, f"{done} {rollout}.", messages.SUCCESS)
        return rollout

    @admin.display(description="stage")
    def stage_display(self, rollout: Rollout) -> str:
        return f"{rollout.current_stage + 1} of {rollout.stage_count}"  # type: ignore[attr-defined]  # annotated

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
            except ServiceError as exc:
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
