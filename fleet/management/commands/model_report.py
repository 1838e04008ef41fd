from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from fleet.choices import ArtifactRole
from fleet.models import ModelVersion


class Command(BaseCommand):
    help = "A Markdown table of a version's variants against fp32: size, cosine, latency, memory, verdict."

    def add_arguments(self, parser):
        parser.add_argument("model", help="model name")
        parser.add_argument("--number", type=int, help="version number (default: the newest)")

    def handle(self, *args, model: str, number: int | None, **options):
        versions = ModelVersion.objects.filter(model__name=model).order_by("-number")
        found = versions.filter(number=number).first() if number else versions.first()
        if found is None:
            raise CommandError(f"no version of {model!r}" + (f" numbered {number}" if number else ""))
        self.stdout.write(report(found))


def report(version: ModelVersion) -> str:
    artifacts = list(
        version.artifacts.filter(role=ArtifactRole.MODEL, evaluation__isnull=False)
        .select_related("evaluation")
        .order_by("id")
    )
    reference = next((a for a in artifacts if a.derived_from_id is None), None)
    if reference is None:
        raise CommandError(f"{version.label} has no evaluated fp32 reference: run its pipeline first")
    base = reference.evaluation
    lines = [
        f"{version.label}, {base.samples} evaluation samples, measured {timezone.now():%Y-%m-%d} "
        f"(threshold: mean cosine >= {version.quality_threshold})",
        "",
        "| variant | recipe | size (MB) | size vs fp32 | mean cosine | min cosine | max abs error "
        "| median ms | p95 ms | speed-up vs fp32 | peak memory (MB) | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for artifact in artifacts:
        e = artifact.evaluation
        params = ", ".join(f"{k}={v}" for k, v in artifact.recipe.get("parameters", {}).items())
        lines.append(
            f"| {artifact.precision} | {params} | {artifact.size / 1e6:.1f} | {artifact.size / reference.size:.1%} "
            f"| {e.mean_cosine:.4f} | {e.min_cosine:.4f} | {e.max_abs_error:.3g} | {e.latency_median_ms:.2f} "
            f"| {e.latency_p95_ms:.2f} | {base.latency_median_ms / e.latency_median_ms:.2f}x "
            f"| {e.peak_memory_bytes / 1e6:.0f} | {artifact.quality} |"
        )
    return "\n".join(lines)
