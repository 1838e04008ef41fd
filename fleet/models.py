from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models

from fleet.choices import (
    ArtifactRole,
    ArtifactStatus,
    DeploymentState,
    EnrollmentState,
    HardwareClass,
    HoldAction,
    InferenceTask,
    PipelineState,
    PipelineStepKind,
    PipelineStepState,
    Pooling,
    Precision,
    RolloutBaseline,
    RolloutState,
    VariantQuality,
    VersionStatus,
)

# The same rule as agent.contract.wire.DeviceId: safe inside a topic, never a wildcard.
device_id_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$",
    "Use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.",
)
slug_validator = RegexValidator(r"^[a-z0-9][a-z0-9_.\-]{0,99}$", "Use lower-case letters, digits, '.', '_' or '-'.")
# Not all digits: in "model:ref" a number names a version, anything else an alias.
alias_validator = RegexValidator(
    r"^(?![0-9]+$)[a-z0-9][a-z0-9_\-]{0,63}$",
    "Use lower-case letters, digits, '_' or '-', not only digits.",
)
tag_key_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.:/\-]{0,63}$", "Use letters, digits, '.', '_', ':', '/' or '-'."
)


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
    # How an agent turns text into inputs and outputs into a result (agent.contract.wire.InferenceSpec).
    task = models.CharField(max_length=16, choices=InferenceTask.choices, default=InferenceTask.TENSOR)
    pooling = models.CharField(max_length=8, choices=Pooling.choices, default=Pooling.NONE)
    normalize = models.BooleanField(default=False)
    max_length = models.PositiveIntegerField(default=256)
    # A variant whose mean cosine to fp32 on the evaluation set is below this is rejected; for a
    # generate version, one whose greedy tokens agree with the reference's on fewer positions.
    quality_threshold = models.FloatField(default=0.99)
    # Its model signature differs from its parent's: clients of the parent may break.
    breaking = models.BooleanField(default=False)

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
        if not 0 < self.quality_threshold <= 1:
            raise ValidationError({"quality_threshold": "A cosine similarity: more than 0, at most 1."})


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
    # While ``processing``: a worker checks the file until then (fleet.services.registry.process_artifact).
    # Past it, the worker is presumed dead and another may claim the file; null until first claimed.
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # Filled by the processing task: the content-addressed key, hashes and chunk manifest.
    size = models.PositiveBigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    storage_key = models.CharField(max_length=300)
    chunk_size = models.PositiveIntegerField(default=0)
    chunk_hashes = models.JSONField(default=list, blank=True)
    chunk_count = models.PositiveIntegerField(default=0)
    # Content-defined chunks: the length of each (agent.contract.manifest). Empty: fixed chunk_size chunks.
    chunk_lengths = models.JSONField(default=list, blank=True)
    # Lineage: the artifact this variant was built from, and how (tool, version, parameters).
    derived_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="variants")
    # The model artifact this file belongs with (its external weights): a device fetching that
    # model fetches this too.
    part_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="parts")
    recipe = models.JSONField(default=dict, blank=True)
    # Input and output names, dtypes and shapes, read from the ONNX file; opsets it imports.
    signature = models.JSONField(default=dict, blank=True)
    # The plane's Ed25519 signature over the file's manifest (agent.contract.signing), set when the
    # version is published; agents refuse a file whose signature does not verify.
    manifest_signature = models.CharField(max_length=200, blank=True)
    quality = models.CharField(max_length=16, choices=VariantQuality.choices, default=VariantQuality.UNEVALUATED)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["version", "role", "precision"]

    def __str__(self) -> str:
        return f"{self.version.label} {self.role} {self.precision or ''} {self.hardware_class}".strip()

    def clean(self) -> None:
        if self.role == ArtifactRole.MODEL and not self.precision:
            raise ValidationError({"precision": "A model artifact needs a precision."})


class Alias(models.Model):
    """A movable name for one published version of a model, such as "stable" or "canary"."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=64, validators=[alias_validator])
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="aliases")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model__name", "name"]
        verbose_name_plural = "aliases"
        constraints = [models.UniqueConstraint(fields=["model", "name"], name="unique_model_alias")]

    def __str__(self) -> str:
        return f"{self.model.name}:{self.name}"

    def clean(self) -> None:
        if self.version_id and self.model_id and self.version.model_id != self.model_id:
            raise ValidationError({"version": "An alias points at a version of its own model."})
        if self.version_id and not self.version.is_published:
            raise ValidationError({"version": f"{self.version.label} is {self.version.status}; publish it first."})


class AliasMove(models.Model):
    """One move of an alias: from which version to which, by whom, when and why."""

    alias = models.ForeignKey(Alias, on_delete=models.CASCADE, related_name="moves")
    # Null once that version is deleted; the labels keep what it was.
    from_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    to_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    from_label = models.CharField(max_length=120, blank=True)
    to_label = models.CharField(max_length=120)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor_label = models.CharField(max_length=150)
    reason = models.TextField(blank=True)
    moved_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-moved_at", "-id"]

    def __str__(self) -> str:
        return f"{self.alias}: {self.from_label or '(new)'} -> {self.to_label}"


class VersionTag(models.Model):
    """A free-form key and value on a version, e.g. dataset=msmarco; an annotation, not part of the release."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="tags")
    key = models.CharField(max_length=64, validators=[tag_key_validator])
    value = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["version", "key"]
        constraints = [models.UniqueConstraint(fields=["version", "key"], name="unique_version_tag")]

    def __str__(self) -> str:
        return f"{self.key}={self.value}" if self.value else self.key


class Tag(models.Model):
    """A label on devices, used to select them."""

    name = models.CharField(max_length=64, unique=True, validators=[slug_validator])

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @classmethod
    def name_problems(cls, name: object) -> list[str]:
        """Why ``name`` cannot be a tag's (blank, too long, not a slug), in sentences naming it; empty if it can."""
        if not isinstance(name, str):
            return [f"A tag is a name, not {name!r}."]
        try:
            cls(name=name).clean_fields()
        except ValidationError as exc:
            shown = name if len(name) <= 40 else f"{name[:40]}…"
            return [f"Tag '{shown}': {message}" for message in exc.messages]
        return []


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
    # Enrollment (docs/protocol.md). A device that registers by its hello alone, where enrollment
    # is not required (ENROLLMENT_REQUIRED=false), counts as accepted.
    enrollment = models.CharField(max_length=16, choices=EnrollmentState.choices, default=EnrollmentState.ACCEPTED)
    public_key = models.CharField(max_length=64, blank=True, help_text="Ed25519, raw 32 bytes in base64.")
    enrollment_token = models.ForeignKey(
        "EnrollmentToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="devices"
    )
    # The newest signed timestamp (ms) the device fetched credentials with: an older one is a replay.
    credentials_signed_at = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["device_id"]

    def __str__(self) -> str:
        return self.device_id


class EnrollmentToken(models.Model):
    """A secret an agent presents to join the fleet; only its hash is stored."""

    name = models.CharField(max_length=100)
    # The first characters of the token, to tell tokens apart without revealing them.
    prefix = models.CharField(max_length=8)
    token_hash = models.CharField(max_length=64, unique=True)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Devices enrolling with this token are accepted at once, without an operator.
    auto_approve = models.BooleanField(default=False)
    max_devices = models.PositiveIntegerField(null=True, blank=True, help_text="Empty: no limit.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


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

    # No index of its own: (device, -received_at) below serves every lookup by device, and each
    # index is one more write for every heartbeat stored.
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="heartbeats", db_index=False)
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
    # Generative models: chat completions since the last heartbeat, their time to first token
    # and decode rate (agent.contract.wire.GenerationStats). Zero requests: no generation ran.
    gen_requests = models.PositiveIntegerField(default=0)
    gen_errors = models.PositiveIntegerField(default=0)
    gen_tokens = models.PositiveIntegerField(default=0)
    ttft_p50_ms = models.FloatField(null=True, blank=True)
    ttft_p95_ms = models.FloatField(null=True, blank=True)
    decode_tps_p50 = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at"]
        indexes = [
            models.Index(fields=["device", "-received_at"]),
            # The fleet-wide heartbeat list, newest first, and retention by age.
            models.Index(fields=["-received_at"], name="heartbeat_received"),
            # A rollout's health gate reads the heartbeats of its deployments.
            models.Index(fields=["deployment_id_reported"], name="heartbeat_deployment"),
        ]
        constraints = [
            # A heartbeat sent again (MQTT QoS 1 is at-least-once, the agent's outbox resends
            # after an outage) is stored once. seq restarts when the agent does, so seq alone
            # is not the key: the same seq and the same sent_at are the same message.
            models.UniqueConstraint(fields=["device", "seq", "sent_at"], name="unique_heartbeat_message"),
        ]

    def __str__(self) -> str:
        return f"{self.device.device_id} #{self.seq}"


class HeartbeatRollup(models.Model):
    """One device's heartbeats over one hour of arrival: kept longer than the raw rows, read by charts and history."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="rollups", db_index=False)
    # The start of the hour (UTC) in which the heartbeats reached a bridge.
    hour = models.DateTimeField()
    heartbeats = models.PositiveIntegerField()
    requests = models.PositiveBigIntegerField(default=0)
    errors = models.PositiveBigIntegerField(default=0)
    latency_count = models.PositiveBigIntegerField(default=0)
    # Each a percentile, over the hour's heartbeats, of the heartbeats' own p50, p95 and p99: an
    # approximation (the raw latencies stay on the device), unweighted by each interval's count.
    p50_ms = models.FloatField(null=True, blank=True)
    p95_ms = models.FloatField(null=True, blank=True)
    p99_ms = models.FloatField(null=True, blank=True)
    max_ms = models.FloatField(null=True, blank=True)
    cpu_percent = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-hour"]
        constraints = [
            # One row a device and hour: rolling an hour up again replaces it. It also serves a device's history.
            models.UniqueConstraint(fields=["device", "hour"], name="unique_rollup_hour"),
        ]
        indexes = [models.Index(fields=["-hour"], name="rollup_hour")]

    def __str__(self) -> str:
        return f"{self.device.device_id} {self.hour:%Y-%m-%d %H}:00"


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


class Rollout(models.Model):
    """A staged release of one version to a selection of devices, gated stage by stage."""

    name = models.CharField(max_length=200, blank=True)
    # The target is a version, or an alias: then ``version`` is where the alias pointed when the
    # rollout was created, and it is resolved again (and recorded) when the rollout starts.
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="rollouts")
    alias = models.ForeignKey(Alias, null=True, blank=True, on_delete=models.SET_NULL, related_name="rollouts")
    state = models.CharField(max_length=16, choices=RolloutState.choices, default=RolloutState.DRAFT)
    # The selector: devices carrying any of the tags (tags stand for device groups), or named by
    # id; narrowed to one hardware class when set. Empty tags and ids select nothing.
    selector_tags = models.JSONField(default=list, blank=True)
    selector_device_ids = models.JSONField(default=list, blank=True)
    selector_hardware_class = models.CharField(max_length=32, choices=HardwareClass.choices, blank=True)
    baseline = models.CharField(
        max_length=16, choices=RolloutBaseline.choices, default=RolloutBaseline.PREVIOUS_VERSION
    )
    # Like AWS IoT Jobs' maximumPerMinute: new assignments in any 60 seconds.
    max_per_minute = models.PositiveIntegerField(default=1000)
    current_stage = models.PositiveIntegerField(default=0)
    stage_started_at = models.DateTimeField(null=True, blank=True)
    # Promote: the current stage need not soak any longer; its gates still apply.
    soak_skipped = models.BooleanField(default=False)
    # Why the rollout ended as it did, and the gate values at that moment.
    reason = models.TextField(blank=True)
    gates = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        permissions = [("release_rollout", "Can start, pause, resume, promote, abort and roll back rollouts")]

    def __str__(self) -> str:
        return self.name or f"rollout {self.pk} of {self.version.label}"

    def clean(self) -> None:
        if not self.selector_tags and not self.selector_device_ids:
            raise ValidationError({"selector": "Select devices by 'tags', by 'devices' (ids), or both."})
        # A name no device can carry selects nothing: a typo, refused however the rollout came in.
        problems = [problem for name in self.selector_tags for problem in Tag.name_problems(name)]
        if problems:
            raise ValidationError({"selector": problems})
        if self.max_per_minute < 1:
            raise ValidationError({"max_per_minute": "At least one assignment a minute."})


class RolloutStage(models.Model):
    """One step of a rollout: how far it reaches, how long it soaks, and the gates it must pass."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="stages")
    index = models.PositiveIntegerField()
    name = models.CharField(max_length=64, blank=True)
    # How many selected devices run the new version once this stage is reached: cumulative.
    percent = models.DecimalField(max_digits=5, decimal_places=2, null=True, blank=True)
    device_count = models.PositiveIntegerField(null=True, blank=True)
    min_soak_seconds = models.PositiveIntegerField(default=0)
    # Success: at least this share of the stage's eligible devices are active.
    success_percent = models.DecimalField(max_digits=5, decimal_places=2, default=100)
    # Failure: more than this share of the finished devices failed or rolled back, judged
    # once at least failure_min_finished devices of the stage have finished.
    failure_percent = models.DecimalField(max_digits=5, decimal_places=2, default=0)
    failure_min_finished = models.PositiveIntegerField(default=1)
    # Health, off when health_p95_ratio is null: p95 ≤ ratio × baseline and error rate ≤
    # baseline + points, over at least health_min_samples inference calls on each side.
    health_p95_ratio = models.DecimalField(max_digits=6, decimal_places=3, null=True, blank=True)
    health_error_points = models.DecimalField(max_digits=5, decimal_places=2, default=1)
    health_min_samples = models.PositiveIntegerField(default=100)
    # Generation gate, for generative models, off when both are null: time to first token p95
    # at most health_ttft_ratio × the baseline's, decode tokens/s at least health_tps_ratio × the
    # baseline's, over at least health_min_samples chat completions on each side.
    health_ttft_ratio = models.DecimalField(max_digits=6, decimal_places=3, null=True, blank=True)
    health_tps_ratio = models.DecimalField(max_digits=6, decimal_places=3, null=True, blank=True)
    # A stage held by an inconclusive gate after its soak waits at most this long, then acts.
    inconclusive_timeout = models.PositiveIntegerField(default=3600, help_text="Seconds.")
    inconclusive_action = models.CharField(max_length=16, choices=HoldAction.choices, default=HoldAction.HOLD)
    started_at = models.DateTimeField(null=True, blank=True)
    passed_at = models.DateTimeField(null=True, blank=True)
    # Since when the stage has been held by an inconclusive gate, and when that hold ran out.
    held_since = models.DateTimeField(null=True, blank=True)
    hold_expired_at = models.DateTimeField(null=True, blank=True)
    # The gates as last judged once the stage passed or the rollout ended: the final verdicts.
    final_gates = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["rollout", "index"]
        constraints = [models.UniqueConstraint(fields=["rollout", "index"], name="unique_rollout_stage")]

    def __str__(self) -> str:
        return self.name or f"stage {self.index + 1}"

    @property
    def size_label(self) -> str:
        if self.percent is not None:
            return f"{self.percent.normalize():f}%"
        return f"{self.device_count} device{'' if self.device_count == 1 else 's'}"

    def clean(self) -> None:
        # A stage's own rules; those across stages are fleet/services/stages.py's.
        if (self.percent is None) == (self.device_count is None):
            raise ValidationError("Give each stage a 'percent' or a 'device_count', not both.")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValidationError({"percent": "More than 0 and at most 100."})
        if self.device_count is not None and self.device_count < 1:
            raise ValidationError({"device_count": "At least one device."})
        for name in ("success_percent", "failure_percent"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValidationError({name: "Between 0 and 100."})
        if self.health_p95_ratio is not None and self.health_p95_ratio <= 0:
            raise ValidationError({"health_p95_ratio": "More than 0."})
        if self.health_error_points < 0:
            raise ValidationError({"health_error_points": "At least 0."})
        if self.inconclusive_timeout < 1:
            raise ValidationError({"inconclusive_timeout": "At least one second."})


class RolloutDevice(models.Model):
    """A device's place in a rollout: its stage for good, and what it ran before."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="members")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="rollout_memberships")
    stage_index = models.PositiveIntegerField()
    # The rollout's deployment of its version; null when the device could not take it.
    deployment = models.OneToOneField(
        Deployment, null=True, blank=True, on_delete=models.SET_NULL, related_name="rollout_member"
    )
    ineligible_reason = models.TextField(blank=True)
    previous_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    rollback_deployment = models.ForeignKey(
        Deployment, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    assigned_at = models.DateTimeField()

    class Meta:
        ordering = ["rollout", "stage_index", "device"]
        constraints = [models.UniqueConstraint(fields=["rollout", "device"], name="unique_rollout_device")]
        indexes = [models.Index(fields=["rollout", "assigned_at"])]

    def __str__(self) -> str:
        return f"{self.device} in {self.rollout} (stage {self.stage_index + 1})"


# --- Model pipeline: variants, their evaluation, and pins -------------------------------


class Pipeline(models.Model):
    """One run of the optimization pipeline: variants built from a version's fp32 artifact."""

    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="pipelines")
    source = models.ForeignKey(Artifact, on_delete=models.PROTECT, related_name="pipelines")
    state = models.CharField(max_length=16, choices=PipelineState.choices, default=PipelineState.QUEUED)
    # Which variants, and their parameters (e.g. {"variants": ["int8"], "int4_block_size": 32}).
    options = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"pipeline {self.pk} of {self.version.label} ({self.state})"


class PipelineStep(models.Model):
    """One task of a pipeline: the evaluation set, or one variant built and evaluated."""

    pipeline = models.ForeignKey(Pipeline, on_delete=models.CASCADE, related_name="steps")
    kind = models.CharField(max_length=16, choices=PipelineStepKind.choices)
    state = models.CharField(max_length=16, choices=PipelineStepState.choices, default=PipelineStepState.PENDING)
    artifact = models.ForeignKey(Artifact, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    error = models.TextField(blank=True)
    # Where a long step has got to, e.g. "repack: layer 12/30" (generative conversions).
    progress = models.CharField(max_length=200, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["pipeline", "id"]
        constraints = [models.UniqueConstraint(fields=["pipeline", "kind"], name="unique_pipeline_step")]

    def __str__(self) -> str:
        return f"{self.kind} ({self.state})"


class VariantEvaluation(models.Model):
    """A model artifact measured against its version's fp32 reference on the evaluation set."""

    artifact = models.OneToOneField(Artifact, on_delete=models.CASCADE, related_name="evaluation")
    evaluation_set = models.ForeignKey(Artifact, on_delete=models.PROTECT, related_name="+")
    samples = models.PositiveIntegerField()
    # Embedding and tensor models; empty for a generative model.
    mean_cosine = models.FloatField(null=True, blank=True)
    min_cosine = models.FloatField(null=True, blank=True)
    max_abs_error = models.FloatField(null=True, blank=True)
    # Generative models: the share of the reference's first greedy tokens this variant repeats
    # (fleet.lib.gguf.evaluate.token_agreement), its perplexity on held-out text, its speed.
    token_agreement = models.FloatField(null=True, blank=True)
    perplexity = models.FloatField(null=True, blank=True)
    decode_tokens_per_s = models.FloatField(null=True, blank=True)
    ttft_ms = models.FloatField(null=True, blank=True)
    # Figures beside the verdict, e.g. a generative variant's free-running and prefix agreement.
    details = models.JSONField(default=dict, blank=True)
    # On the plane's CPU, one sample per run, in a fresh process.
    latency_median_ms = models.FloatField()
    latency_p95_ms = models.FloatField()
    # RSS high-water mark over the process's baseline while loading and running the model.
    peak_memory_bytes = models.PositiveBigIntegerField()
    threshold = models.FloatField()
    accepted = models.BooleanField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["artifact"]

    def __str__(self) -> str:
        if self.token_agreement is not None:
            return f"evaluation of artifact {self.artifact_id}: token agreement {self.token_agreement:.1%}"
        return f"evaluation of artifact {self.artifact_id}: cosine {self.mean_cosine:.4f}"


class VariantPin(models.Model):
    """An operator's choice of variant for a device or for every device with a tag."""

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="pins")
    artifact = models.ForeignKey(Artifact, on_delete=models.CASCADE, related_name="pins")
    device = models.ForeignKey(Device, null=True, blank=True, on_delete=models.CASCADE, related_name="variant_pins")
    tag = models.ForeignKey(Tag, null=True, blank=True, on_delete=models.CASCADE, related_name="variant_pins")
    reason = models.TextField(blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["version", "-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(device__isnull=True) ^ models.Q(tag__isnull=True), name="pin_device_xor_tag"
            ),
            models.UniqueConstraint(fields=["version", "device"], name="unique_device_pin"),
            models.UniqueConstraint(fields=["version", "tag"], name="unique_tag_pin"),
        ]

    def __str__(self) -> str:
        target = self.device or f"tag {self.tag}"
        return f"{self.version.label} on {target}: artifact {self.artifact_id}"

    def clean(self) -> None:
        if (self.device_id is None) == (self.tag_id is None):
            raise ValidationError("Pin a variant for one device or one tag.")
        if self.artifact_id and self.version_id and self.artifact.version_id != self.version_id:
            raise ValidationError({"artifact": "The variant must be an artifact of the pinned version."})
        if self.artifact_id and self.artifact.role != ArtifactRole.MODEL:
            raise ValidationError({"artifact": "Only a model artifact can be pinned."})
