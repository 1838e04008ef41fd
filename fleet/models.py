from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from fleet.choices import (
    ArtifactRole,
    ArtifactStatus,
    DeploymentState,
    HardwareClass,
    InferenceTask,
    Pooling,
    Precision,
    VersionStatus,
)

# The same rule as agent.wire.DeviceId: safe inside a topic, never a wildcard.
device_id_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
    "Use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
)
slug_validator = RegexValidator(r"^[a-z0-9][a-z0-9_.\-]{0,99}$", "Use lower-case letters, digits, '.', '_' or '-'.")


class Model(models.Model):
    """A named model family, such as "minilm-embedder"; its versions hold the files."""

    name = models.CharField(max_length=100, unique=True, validators=[slug_validator])
    description = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """One numbered release of a model; immutable once published."""

    model = models.ForeignKey(Model, on_delete=models.PROTECT, related_name="versions")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=16, choices=VersionStatus.choices, default=VersionStatus.DRAFT)
    notes = models.TextField(blank=True)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="children")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    published_at = models.DateTimeField(null=True, blank=True)
    # How an agent turns text into inputs and outputs into a result (agent.wire.InferenceSpec).
    task = models.CharField(max_length=16, choices=InferenceTask.choices, default=InferenceTask.TENSOR)
    pooling = models.CharField(max_length=8, choices=Pooling.choices, default=Pooling.NONE)
    normalize = models.BooleanField(default=False)
    max_length = models.PositiveIntegerField(default=256)

    class Meta:
        ordering = ["model__name", "-number"]
        constraints = [models.UniqueConstraint(fields=["model", "number"], name="unique_version_number")]

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        return f"{self.model.name}:{self.number}"

    @property
    def is_published(self) -> bool:
        return self.status == VersionStatus.PUBLISHED

    def clean(self) -> None:
        if self.parent_id and self.parent_id == self.pk:
            raise ValidationError({"parent": "A version cannot be its own parent."})
        if self.parent and self.parent.model_id != self.model_id:
            raise ValidationError({"parent": "The parent must be a version of the same model."})
        if self.pooling != Pooling.NONE and self.task != InferenceTask.EMBEDDING:
            raise ValidationError({"pooling": "Pooling applies to embedding models only."})


class Artifact(models.Model):
    """One file of a version: a model variant for a hardware class, or its tokenizer."""

    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="artifacts")
    role = models.CharField(max_length=16, choices=ArtifactRole.choices, default=ArtifactRole.MODEL)
    filename = models.CharField(max_length=200)
    format = models.CharField(max_length=16, default="onnx")
    precision = models.CharField(max_length=8, choices=Precision.choices, blank=True)
    hardware_class = models.CharField(max_length=32, choices=HardwareClass.choices, default=HardwareClass.ANY)
    status = models.CharField(max_length=16, choices=ArtifactStatus.choices, default=ArtifactStatus.PROCESSING)
    error = models.TextField(blank=True)
    # Filled by the processing task: the content-addressed key, hashes and chunk manifest.
    size = models.PositiveBigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    storage_key = models.CharField(max_length=300)
    chunk_size = models.PositiveIntegerField(default=0)
    chunk_hashes = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["version", "role", "precision"]

    def __str__(self) -> str:
        return f"{self.version.label} {self.role} {self.precision or ''} {self.hardware_class}".strip()

    def clean(self) -> None:
        if self.role == ArtifactRole.MODEL and not self.precision:
            raise ValidationError({"precision": "A model artifact needs a precision."})


class Tag(models.Model):
    """A label on devices, used to select them."""

    name = models.CharField(max_length=64, unique=True, validators=[slug_validator])

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Device(models.Model):
    """An edge device running the agent, with the hardware profile it last reported."""

    device_id = models.CharField(max_length=64, unique=True, validators=[device_id_validator])
    name = models.CharField(max_length=200, blank=True)
    tags = models.ManyToManyField(Tag, blank=True, related_name="devices")
    arch = models.CharField(max_length=32, blank=True)
    os = models.CharField(max_length=32, blank=True)
    os_release = models.CharField(max_length=200, blank=True)
    cpu_model = models.CharField(max_length=200, blank=True)
    cpu_count = models.PositiveIntegerField(default=0)
    cpu_flags = models.JSONField(default=list, blank=True)
    ram_bytes = models.PositiveBigIntegerField(default=0)
    disk_free_bytes = models.PositiveBigIntegerField(default=0)
    providers = models.JSONField(default=list, blank=True)
    agent_version = models.CharField(max_length=64, blank=True)
    hardware_class = models.CharField(max_length=32, choices=HardwareClass.choices, blank=True)
    online = models.BooleanField(default=False)
    first_seen = models.DateTimeField(auto_now_add=True)
    last_seen = models.DateTimeField(null=True, blank=True, db_index=True)
    current_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="running_devices"
    )
    current_artifact = models.ForeignKey(Artifact, null=True, blank=True, on_delete=models.PROTECT, related_name="+")

    class Meta:
        ordering = ["device_id"]

    def __str__(self) -> str:
        return self.device_id


class Deployment(models.Model):
    """A device's desired version and how far the device has got in taking it."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="deployments")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="deployments")
    artifact = models.ForeignKey(Artifact, on_delete=models.PROTECT, related_name="deployments")
    state = models.CharField(max_length=16, choices=DeploymentState.choices, default=DeploymentState.PENDING)
    error = models.TextField(blank=True)
    bytes_done = models.PositiveBigIntegerField(default=0)
    bytes_total = models.PositiveBigIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    downloading_at = models.DateTimeField(null=True, blank=True)
    verifying_at = models.DateTimeField(null=True, blank=True)
    active_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["device", "state"])]

    def __str__(self) -> str:
        return f"{self.version.label} on {self.device.device_id} ({self.state})"


class Heartbeat(models.Model):
    """One health and latency report of a device: the time series the gates read."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="heartbeats")
    received_at = models.DateTimeField()
    sent_at = models.DateTimeField()
    seq = models.PositiveBigIntegerField()
    uptime_s = models.FloatField()
    cpu_percent = models.FloatField()
    mem_rss_bytes = models.PositiveBigIntegerField()
    mem_available_bytes = models.PositiveBigIntegerField()
    deployment_id_reported = models.PositiveBigIntegerField(null=True, blank=True)
    active_sha256 = models.CharField(max_length=64, blank=True)
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0)
    latency_count = models.PositiveIntegerField(default=0)
    p50_ms = models.FloatField(null=True, blank=True)
    p95_ms = models.FloatField(null=True, blank=True)
    p99_ms = models.FloatField(null=True, blank=True)
    max_ms = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at"]
        indexes = [models.Index(fields=["device", "-received_at"])]

    def __str__(self) -> str:
        return f"{self.device.device_id} #{self.seq}"


class AuditEvent(models.Model):
    """A record of one state change: who did what to which object, and why."""

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    # "user:alice", "device:dev-1" or "system": kept even if the user goes.
    actor_label = models.CharField(max_length=150)
    action = models.CharField(max_length=64)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=200)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    reason = models.TextField(blank=True)
    source_address = models.GenericIPAddressField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.actor_label} {self.action} {self.object_type}:{self.object_id}"
