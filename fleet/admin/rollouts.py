"""Rollouts in the admin: stages, gate values, transitions for release managers."""

from django.contrib import admin, messages
from django.db.models import Count
from django.utils.html import format_html, format_html_join
from django.utils.safestring import mark_safe

from fleet.admin.base import ReadOnlyAdmin, ReadOnlyInline
from fleet.models import (
    Rollout,
    RolloutStage,
)
from fleet.services import rollouts
from fleet.services.rollouts import RolloutError


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
