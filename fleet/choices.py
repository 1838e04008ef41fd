"""Every state and category of the fleet, in one place."""

from django.db import models


class Precision(models.TextChoices):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4 = "int4"


class HardwareClass(models.TextChoices):
    ANY = "any", "Any hardware"
    LINUX_X86_64 = "linux-x86_64", "Linux x86_64"
    LINUX_AARCH64 = "linux-aarch64", "Linux aarch64"
    DARWIN_ARM64 = "darwin-arm64", "macOS arm64"


class ArtifactRole(models.TextChoices):
    MODEL = "model"
    # A model's external weights (model.onnx.data): fetched with the model artifact it is part of.
    MODEL_DATA = "model_data"
    TOKENIZER = "tokenizer"
    # A generative bundle's genai_config.json: fetched with every variant of the version.
    CONFIG = "config"
    # Inputs and fp32 reference outputs the plane checks variants against; never sent to devices.
    EVALUATION = "evaluation"
    # The file a version was imported from and its variants are built from (a GGUF); never sent to devices.
    SOURCE = "source"


class ArtifactStatus(models.TextChoices):
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


class VersionStatus(models.TextChoices):
    DRAFT = "draft"
    PUBLISHED = "published"
    # Retired: never offered to a device again, its files kept (services.retention).
    ARCHIVED = "archived"


class DeploymentState(models.TextChoices):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    ACTIVE = "active"
    FAILED = "failed"
    # The device cannot take it (too little disk or RAM, no execution provider); not a failure.
    INELIGIBLE = "ineligible"
    # It was active, and the device went back to its previous model on its own.
    ROLLED_BACK = "rolled_back"
    # A newer assignment replaced this one before or after it finished.
    SUPERSEDED = "superseded"


OPEN_DEPLOYMENT_STATES = (DeploymentState.PENDING, DeploymentState.DOWNLOADING, DeploymentState.VERIFYING)
# Forward order of the states an agent reports; a report never moves a deployment back.
DEPLOYMENT_PROGRESS = {
    DeploymentState.PENDING: 0,
    DeploymentState.DOWNLOADING: 1,
    DeploymentState.VERIFYING: 2,
    DeploymentState.ACTIVE: 3,
}


class InferenceTask(models.TextChoices):
    EMBEDDING = "embedding"
    TENSOR = "tensor"
    # A small language model: an onnxruntime-genai decoder bundle, served as chat completions.
    GENERATE = "generate"


class Pooling(models.TextChoices):
    MEAN = "mean"
    CLS = "cls"
    NONE = "none"


class RolloutState(models.TextChoices):
    DRAFT = "draft"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLED_BACK = "rolled_back"


# Deployment states that settle a device's part in a rollout stage: reports of them wake the evaluator.
SETTLED_DEPLOYMENT_STATES = (
    DeploymentState.ACTIVE,
    DeploymentState.FAILED,
    DeploymentState.INELIGIBLE,
    DeploymentState.ROLLED_BACK,
)
# A device in one of these rollouts belongs to it: another rollout may not take it.
ACTIVE_ROLLOUT_STATES = (RolloutState.RUNNING, RolloutState.PAUSED)


class HoldAction(models.TextChoices):
    """What a stage held as inconclusive does once its inconclusive_timeout has passed."""

    # Stay held; the stage shows as held_past_deadline.
    HOLD = "hold"
    # Roll the whole rollout back.
    ROLLBACK = "rollback"
    # Stay held and send the rollout.hold_expired event to the webhooks.
    NOTIFY = "notify"


class RolloutBaseline(models.TextChoices):
    # The stage's own devices, on the version they ran before the rollout reached them.
    PREVIOUS_VERSION = "previous_version", "Same devices on their previous version"
    # Selected devices of the same hardware classes that the rollout has not reached yet.
    CONTROL = "control", "Control devices of the same hardware class"


class VariantQuality(models.TextChoices):
    """What the plane's evaluation says of a model artifact; only rejected and pending ones stay off devices."""

    UNEVALUATED = "unevaluated"
    # The fp32 artifact the variants are compared against.
    REFERENCE = "reference"
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"


# A device is never offered a variant in one of these.
UNOFFERED_QUALITIES = (VariantQuality.PENDING, VariantQuality.REJECTED)


class PipelineState(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


OPEN_PIPELINE_STATES = (PipelineState.QUEUED, PipelineState.RUNNING)


class PipelineStepKind(models.TextChoices):
    EVALUATION_SET = "evaluation_set", "Evaluation set and fp32 reference"
    INT8 = "int8", "int8 dynamic"
    INT4 = "int4", "int4 weight-only"
    FP16 = "fp16", "fp16"
    # Generative models (GGUF): the source's own quantization, repacked without loss.
    REPACK = "repack", "lossless repack of the GGUF quantization"


class PipelineStepState(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class Role(models.TextChoices):
    """What a member of the fleet may do; each is a Django group of the same name (fleet.roles)."""

    VIEWER = "viewer", "Viewer: reads everything"
    OPERATOR = "operator", "Operator: devices and tags"
    RELEASE_MANAGER = "release-manager", "Release manager: versions, rollouts and assignments"
    ADMIN = "admin", "Admin: everything but the audit log's history"


class EnrollmentState(models.TextChoices):
    """Where a device stands with the fleet: only an accepted device gets broker credentials."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    # Taken out of the fleet: its broker login is gone, and it cannot enroll again under this id.
    DECOMMISSIONED = "decommissioned"
