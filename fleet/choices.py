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
    TOKENIZER = "tokenizer"


class ArtifactStatus(models.TextChoices):
    PROCESSING = "processing"
    READY = "ready"
    FAILED = "failed"


class VersionStatus(models.TextChoices):
    DRAFT = "draft"
    PUBLISHED = "published"


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


class Pooling(models.TextChoices):
    MEAN = "mean"
    CLS = "cls"
    NONE = "none"
