from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from fleet.choices import ArtifactRole, InferenceTask, VariantQuality
from fleet.models import ModelVersion


class Command(BaseCommand):
    help = (
        "A Markdown table of a version's variants against fp32: size, cosine (or, for a generative model, "
        "token agreement and perplexity), speed, memory, verdict."
    )

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
    if version.task == InferenceTask.GENERATE:
        return generate_report(version)
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


def generate_report(version: ModelVersion) -> str:
    """A generative version's variants: token agreement, perplexity, decode speed, TTFT, memory."""
    artifacts = list(
        version.artifacts.filter(role=ArtifactRole.MODEL, evaluation__isnull=False)
        .select_related("evaluation")
        .prefetch_related("parts")
        .order_by("id")
    )
    reference = next((a for a in artifacts if a.quality == VariantQuality.REFERENCE), None)
    if reference is None:
        raise CommandError(f"{version.label} has no evaluated fp32 reference: run its pipeline first")
    base = reference.evaluation
    lines = [
        f"{version.label}, {base.samples} prompts, measured {timezone.now():%Y-%m-%d} (accepted: teacher-forced "
        f"token agreement >= {version.quality_threshold:.0%} and perplexity within 10% of the reference's)",
        "",
        "| variant | recipe | size (MB) | token agreement | free-running agreement | perplexity "
        "| decode tok/s (1 thread) | TTFT ms (16 tokens) | peak RSS (MB) | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for artifact in artifacts:
        e = artifact.evaluation
        size = artifact.size + sum(p.size for p in artifact.parts.all())
        variant = artifact.recipe.get("parameters", {}).get("variant", artifact.precision)
        lines.append(
            f"| {variant} | {artifact.precision} | {size / 1e6:.1f} | {e.token_agreement:.1%} "
            f"| {e.details.get('token_agreement', 0):.1%} | {e.perplexity:.2f} | {e.decode_tokens_per_s:.1f} "
            f"| {e.ttft_ms:.0f} | {e.peak_memory_bytes / 1e6:.0f} | {artifact.quality} |"
        )
    return "\n".join(lines)
