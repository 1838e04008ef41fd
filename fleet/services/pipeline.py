"""The model pipeline: import a checkpoint, build variants from fp32, evaluate and gate them.

Each step is a Celery task (see fleet.tasks) that calls one function here. The heavy work
(conversion, measuring) runs outside any transaction; each state change is a short
atomic compare-and-swap with its audit row.
"""

from __future__ import annotations

import logging
import tempfile
import traceback
from functools import partial
from pathlib import Path

import numpy as np
from django.db import transaction
from django.utils import timezone

from fleet import jobs
from fleet.choices import (
    OPEN_PIPELINE_STATES,
    ArtifactRole,
    ArtifactStatus,
    InferenceTask,
    PipelineState,
    PipelineStepKind,
    PipelineStepState,
    Pooling,
    Precision,
    VariantQuality,
)
from fleet.lib import bert_onnx, evaluation, quantize
from fleet.models import Artifact, Model, ModelVersion, Pipeline, PipelineStep, VariantEvaluation
from fleet.services import registry
from fleet.services.audit import Actor, acting_user, record
from fleet.storage import get_store

log = logging.getLogger(__name__)

VARIANT_KINDS = (PipelineStepKind.INT8, PipelineStepKind.INT4, PipelineStepKind.FP16)
DEFAULT_INT4_BLOCK_SIZE = 32
# Repeats over the evaluation set when timing: 32 sentences x 3 = 96 single-sample runs.
LATENCY_REPEATS = 3


class PipelineError(registry.RegistryError):
    """A pipeline the current state does not allow; the text says why."""


# --- Import --------------------------------------------------------------------------


def import_hf_checkpoint(directory: Path, *, model_name: str, actor: Actor, notes: str = "") -> ModelVersion:
    """A new draft version from a BERT-family checkpoint: the fp32 ONNX and its tokenizer."""
    directory = Path(directory)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (directory / name).is_file():
            raise PipelineError(f"{directory} has no {name}")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        try:
            config = bert_onnx.export_checkpoint(directory, onnx_path)
        except bert_onnx.CheckpointError as exc:
            raise PipelineError(str(exc)) from None
        model = Model.objects.filter(name=model_name).first() or registry.create_model(name=model_name, actor=actor)
        parent = model.versions.order_by("-number").first()
        version = registry.create_version(
            model,
            actor=actor,
            parent=parent,
            notes=notes or f"Imported from {directory.name}",
            task=InferenceTask.EMBEDDING,
            pooling=Pooling.MEAN,
            normalize=True,
            max_length=min(256, config.max_position_embeddings),
        )
        recipe = {
            "tool": "fleet.lib.bert_onnx.build_bert_onnx",
            "parameters": {"opset": bert_onnx.OPSET, "source": directory.name, "hidden_size": config.hidden_size},
        }
        registry.add_generated_artifact(
            version, onnx_path, filename="model.onnx", actor=actor, precision=Precision.FP32, recipe=recipe
        )
        registry.add_generated_artifact(
            version, directory / "tokenizer.json", filename="tokenizer.json", actor=actor,
            role=ArtifactRole.TOKENIZER, format="json",
        )  # fmt: skip
    return version


# --- Starting a pipeline -----------------------------------------------------------------


def start_pipeline(
    version: ModelVersion,
    *,
    actor: Actor,
    variants: list[str] | None = None,
    int4_block_size: int = DEFAULT_INT4_BLOCK_SIZE,
    source: Artifact | None = None,
) -> Pipeline:
    """Queue building ``variants`` of the draft's fp32 artifact; the tasks start on commit."""
    variants = list(variants or VARIANT_KINDS)
    unknown = sorted(set(variants) - set(VARIANT_KINDS))
    if unknown or not variants:
        raise PipelineError(f"unknown variants {unknown}; choose among {', '.join(VARIANT_KINDS)}")
    with transaction.atomic():
        # Lock the version: a publish or a second pipeline must not slip in between the checks.
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        if locked.is_published:
            raise PipelineError(f"{locked.label} is published; variants are added to drafts only.")
        if locked.pipelines.filter(state__in=OPEN_PIPELINE_STATES).exists():
            raise PipelineError(f"{locked.label} already has a pipeline running.")
        source = source or _fp32_source(locked)
        pipeline = Pipeline.objects.create(
            version=locked,
            source=source,
            options={"variants": variants, "int4_block_size": int4_block_size},
            created_by=acting_user(actor),
        )
        kinds = [PipelineStepKind.EVALUATION_SET, *[k for k in VARIANT_KINDS if k in variants]]
        PipelineStep.objects.bulk_create([PipelineStep(pipeline=pipeline, kind=k) for k in kinds])
        record(actor, "pipeline.started", pipeline, after=pipeline.options)
        transaction.on_commit(lambda: jobs.enqueue("fleet.run_pipeline", pipeline.pk))
    return pipeline


def _fp32_source(version: ModelVersion) -> Artifact:
    source = (
        version.artifacts.filter(
            role=ArtifactRole.MODEL, precision=Precision.FP32, status=ArtifactStatus.READY, derived_from__isnull=True
        )
        .order_by("id")
        .first()
    )
    if source is None:
        raise PipelineError(f"{version.label} has no ready fp32 model artifact to build variants from.")
    return source


# --- Steps ------------------------------------------------------------------------------


def _claim(step: PipelineStep) -> bool:
    """Pending -> running; False when another worker (or an earlier delivery) took it."""
    changed = PipelineStep.objects.filter(pk=step.pk, state=PipelineStepState.PENDING).update(
        state=PipelineStepState.RUNNING, started_at=timezone.now()
    )
    return changed == 1


def _finish_step(step: PipelineStep, *, artifact: Artifact | None = None, error: str = "") -> None:
    state = PipelineStepState.FAILED if error else PipelineStepState.DONE
    with transaction.atomic():
        PipelineStep.objects.filter(pk=step.pk, state=PipelineStepState.RUNNING).update(
            state=state, artifact=artifact, error=error, finished_at=timezone.now()
        )
        step.refresh_from_db()
        record("system", f"pipeline.step_{state}", step.pipeline, after={"step": step.kind}, reason=error)
    if error:
        log.warning("pipeline %s step %s failed: %s", step.pipeline_id, step.kind, error)
    _finish_pipeline_if_done(step.pipeline_id)


def _finish_pipeline_if_done(pipeline_id: int) -> None:
    with transaction.atomic():
        # Lock the pipeline: the last two variant tasks may finish at the same moment.
        pipeline = Pipeline.objects.select_for_update().get(pk=pipeline_id)
        states = list(pipeline.steps.values_list("state", flat=True))
        if pipeline.state not in OPEN_PIPELINE_STATES or any(
            s in (PipelineStepState.PENDING, PipelineStepState.RUNNING) for s in states
        ):
            return
        failed = PipelineStepState.FAILED in states
        pipeline.state = PipelineState.FAILED if failed else PipelineState.SUCCEEDED
        pipeline.error = "; ".join(
            f"{k}: {e}" for k, e in pipeline.steps.exclude(error="").values_list("kind", "error")
        )[:5000]
        pipeline.finished_at = timezone.now()
        pipeline.save(update_fields=["state", "error", "finished_at"])
        record("system", f"pipeline.{pipeline.state}", pipeline, reason=pipeline.error)


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000] or traceback.format_exc(limit=2)


def run_pipeline(pipeline_id: int) -> Pipeline | None:
    """Build the evaluation set, then queue one task per variant. Idempotent."""
    pipeline = Pipeline.objects.select_related("version", "source").filter(pk=pipeline_id).first()
    if pipeline is None:
        return None
    Pipeline.objects.filter(pk=pipeline.pk, state=PipelineState.QUEUED).update(
        state=PipelineState.RUNNING, started_at=timezone.now()
    )
    step = pipeline.steps.get(kind=PipelineStepKind.EVALUATION_SET)
    if _claim(step):
        try:
            artifact = build_evaluation_set(pipeline)
        except Exception as exc:
            _finish_step(step, error=_error_text(exc))
            # Without a reference there is nothing to compare against: the variants fail too.
            pipeline.steps.filter(state=PipelineStepState.PENDING).update(
                state=PipelineStepState.FAILED, error="no evaluation set", finished_at=timezone.now()
            )
            _finish_pipeline_if_done(pipeline.pk)
            return pipeline
        _finish_step(step, artifact=artifact)
    step.refresh_from_db()
    if step.state == PipelineStepState.DONE:
        for variant in pipeline.steps.exclude(kind=PipelineStepKind.EVALUATION_SET).filter(
            state=PipelineStepState.PENDING
        ):
            transaction.on_commit(partial(jobs.enqueue, "fleet.build_variant", variant.pk))
    return pipeline


def build_evaluation_set(pipeline: Pipeline) -> Artifact:
    """Inputs (real sentences for a text model) and the fp32 outputs, stored as an artifact.

    The fp32 source is measured on it too, so each variant's latency has its baseline.
    """
    version, source = pipeline.version, pipeline.source
    store = get_store()
    inputs = _evaluation_inputs(version, source)
    outputs = evaluation.run_model(store.path(source.storage_key), inputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "evaluation.npz"
        texts = evaluation.default_sentences() if version.task == InferenceTask.EMBEDDING else None
        path.write_bytes(evaluation.dump_set(inputs, outputs, texts=texts))
        existing = version.artifacts.filter(role=ArtifactRole.EVALUATION, derived_from=source).first()
        artifact = existing or registry.add_generated_artifact(
            version, path, filename="evaluation.npz", actor="system", role=ArtifactRole.EVALUATION,
            format="npz", derived_from=source, recipe=_evaluation_recipe(version, inputs),
        )  # fmt: skip
    _record_evaluation(source, artifact, quality=None)
    return artifact


def _evaluation_recipe(version: ModelVersion, inputs: dict[str, np.ndarray]) -> dict:
    kind = "sentences" if version.task == InferenceTask.EMBEDDING else "seeded-random"
    samples = next(iter(inputs.values())).shape[0]
    return {"tool": "fleet.lib.evaluation", "parameters": {"inputs": kind, "samples": samples}}


def _evaluation_inputs(version: ModelVersion, source: Artifact) -> dict[str, np.ndarray]:
    tokenizer = version.artifacts.filter(role=ArtifactRole.TOKENIZER, status=ArtifactStatus.READY).first()
    if version.task == InferenceTask.EMBEDDING:
        if tokenizer is None:
            raise PipelineError(f"{version.label} is a text model without a tokenizer: upload tokenizer.json first.")
        path = get_store().path(tokenizer.storage_key)
        return evaluation.text_inputs(path, evaluation.default_sentences(), max_length=version.max_length)
    return _random_inputs(source.signature)


def _random_inputs(signature: dict, batch: int = 8) -> dict[str, np.ndarray]:
    """Seeded inputs for a tensor model, from its signature; symbolic dimensions become ``batch`` or 16."""
    rng = np.random.default_rng(0)
    inputs = {}
    for spec in signature.get("inputs", []):
        shape = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 16) for i, d in enumerate(spec["shape"])]
        dtype = {"float": np.float32, "double": np.float64, "int64": np.int64, "int32": np.int32}.get(spec["dtype"])
        if dtype is None:
            raise PipelineError(f"input {spec['name']} has dtype {spec['dtype']}, which the pipeline cannot generate")
        values = rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else rng.integers(0, 100, shape)
        inputs[spec["name"]] = values.astype(dtype)
    return inputs


_BUILDERS = {
    PipelineStepKind.INT8: lambda src, dst, options: quantize.quantize_int8(src, dst),
    PipelineStepKind.INT4: lambda src, dst, options: quantize.quantize_int4(
        src, dst, block_size=options.get("int4_block_size", DEFAULT_INT4_BLOCK_SIZE)
    ),
    PipelineStepKind.FP16: lambda src, dst, options: quantize.convert_fp16(src, dst),
}


def build_variant(step_id: int) -> PipelineStep | None:
    """Convert the fp32 source into one variant, store it, evaluate it, accept or reject it."""
    step = PipelineStep.objects.select_related("pipeline__version", "pipeline__source").filter(pk=step_id).first()
    if step is None or not _claim(step):
        return step
    pipeline = step.pipeline
    store = get_store()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"model.{step.kind}.onnx"
            recipe = _BUILDERS[PipelineStepKind(step.kind)](
                store.path(pipeline.source.storage_key), path, pipeline.options
            )
            existing = pipeline.version.artifacts.filter(derived_from=pipeline.source, recipe=recipe).first()
            artifact = existing or registry.add_generated_artifact(
                pipeline.version, path, filename=path.name, actor="system", precision=str(step.kind),
                hardware_class=pipeline.source.hardware_class, derived_from=pipeline.source, recipe=recipe,
                quality=VariantQuality.PENDING,
            )  # fmt: skip
        evaluate_variant(artifact, pipeline)
    except Exception as exc:
        _finish_step(step, error=_error_text(exc))
        return step
    _finish_step(step, artifact=artifact)
    return step


def evaluate_variant(artifact: Artifact, pipeline: Pipeline) -> VariantEvaluation:
    evaluation_set = pipeline.steps.get(kind=PipelineStepKind.EVALUATION_SET).artifact
    if evaluation_set is None:
        raise PipelineError(f"{pipeline.version.label} has no evaluation set to judge its variants with.")
    return _record_evaluation(artifact, evaluation_set, quality=True)


def _record_evaluation(artifact: Artifact, evaluation_set: Artifact, *, quality: bool | None) -> VariantEvaluation:
    """Measure ``artifact`` on the set; gate it on the version's threshold when ``quality``."""
    store = get_store()
    set_path, model_path = store.path(evaluation_set.storage_key), store.path(artifact.storage_key)
    inputs, reference = evaluation.load_set(set_path)
    version = artifact.version
    compared = evaluation.compare(reference, evaluation.run_model(model_path, inputs), inputs, version.pooling)
    performance = evaluation.measure(model_path, set_path, repeats=LATENCY_REPEATS)
    accepted = compared.mean_cosine >= version.quality_threshold
    with transaction.atomic():
        result, _ = VariantEvaluation.objects.update_or_create(
            artifact=artifact,
            defaults={
                "evaluation_set": evaluation_set,
                "samples": compared.samples,
                "mean_cosine": compared.mean_cosine,
                "min_cosine": compared.min_cosine,
                "max_abs_error": compared.max_abs_error,
                "latency_median_ms": performance.latency_median_ms,
                "latency_p95_ms": performance.latency_p95_ms,
                "peak_memory_bytes": performance.peak_memory_bytes,
                "threshold": version.quality_threshold,
                "accepted": accepted,
            },
        )
        if quality is None:
            new_quality, from_states = VariantQuality.REFERENCE, [VariantQuality.UNEVALUATED, VariantQuality.REFERENCE]
        else:
            new_quality = VariantQuality.ACCEPTED if accepted else VariantQuality.REJECTED
            from_states = [VariantQuality.PENDING]
        Artifact.objects.filter(pk=artifact.pk, quality__in=from_states).update(quality=new_quality)
        record(
            "system",
            f"artifact.{new_quality}",
            artifact,
            after={"mean_cosine": round(compared.mean_cosine, 6), "threshold": version.quality_threshold},
        )
    return result
