"""API representations. They reshape and validate; the services change state."""

from django.db.models import Q
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field, extend_schema_serializer
from rest_framework import serializers

from fleet.api.fields import IdentityUrlField
from fleet.choices import ArtifactRole, EnrollmentState, HardwareClass, Precision, VersionStatus
from fleet.models import (
    Alias,
    AliasMove,
    Artifact,
    AuditEvent,
    Deployment,
    Device,
    EnrollmentToken,
    Heartbeat,
    HeartbeatRollup,
    Model,
    ModelVersion,
    Pipeline,
    PipelineStep,
    Rollout,
    RolloutStage,
    Tag,
    VariantEvaluation,
    VariantPin,
    device_id_validator,
    slug_validator,
)
from fleet.services.stages import MAX_STAGES

# One request names at most this many devices, and this many tags.
MAX_NAMED_DEVICES = 10_000
MAX_NAMED_TAGS = 100
MAX_TEXT = 10_000


class NameField(serializers.SlugRelatedField):
    """An object named by a text field. PostgreSQL refuses NUL in text: such a name is invalid, not a 500."""

    def to_internal_value(self, data):
        if isinstance(data, str) and "\x00" in data:
            self.fail("invalid")
        return super().to_internal_value(data)


class RegistryModelSerializer(serializers.ModelSerializer):
    """A model of the registry (named so as not to read as DRF's ModelSerializer)."""

    url = IdentityUrlField(view_name="api:model-detail", lookup_field="name")
    version_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Model
        fields = ["id", "url", "name", "description", "version_count", "created_at"]
        extra_kwargs = {"description": {"max_length": MAX_TEXT}}


class BriefVersionSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:version-detail")
    model = serializers.CharField(source="model.name", read_only=True)

    class Meta:
        model = ModelVersion
        fields = ["id", "url", "label", "model", "number", "status"]


class BriefArtifactSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:artifact-detail")

    class Meta:
        model = Artifact
        fields = [
            "id",
            "url",
            "version",
            "role",
            "filename",
            "format",
            "precision",
            "hardware_class",
            "status",
            "error",
            "size",
            "sha256",
            "chunk_size",
            "chunk_count",
            "quality",
            "derived_from",
            "part_of",
            "created_at",
        ]


class VariantEvaluationSerializer(serializers.ModelSerializer):
    evaluation_set = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = VariantEvaluation
        fields = [
            "evaluation_set",
            "samples",
            "mean_cosine",
            "min_cosine",
            "max_abs_error",
            "token_agreement",
            "perplexity",
            "decode_tokens_per_s",
            "ttft_ms",
            "details",
            "latency_median_ms",
            "latency_p95_ms",
            "peak_memory_bytes",
            "threshold",
            "accepted",
            "created_at",
        ]


class ArtifactSerializer(BriefArtifactSerializer):
    """The whole artifact, with the chunk hashes an agent checks each chunk against."""

    version_label = serializers.CharField(source="version.label", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    evaluation = serializers.SerializerMethodField()

    class Meta(BriefArtifactSerializer.Meta):
        fields = [
            *BriefArtifactSerializer.Meta.fields,
            "version_label",
            "recipe",
            "signature",
            "evaluation",
            "chunk_hashes",
            "chunk_lengths",
            "created_by",
        ]

    @extend_schema_field(VariantEvaluationSerializer(allow_null=True))
    def get_evaluation(self, artifact: Artifact) -> dict | None:
        evaluation = getattr(artifact, "evaluation", None)
        return VariantEvaluationSerializer(evaluation).data if evaluation else None


class VersionSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:version-detail")
    model = NameField(slug_field="name", queryset=Model.objects.all())
    parent = serializers.PrimaryKeyRelatedField(  # type: ignore[assignment]  # the stubs take "parent" for Field's
        queryset=ModelVersion.objects.all(), required=False, allow_null=True
    )
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    artifacts = BriefArtifactSerializer(many=True, read_only=True)
    tags = serializers.SerializerMethodField()
    aliases = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)

    class Meta:
        model = ModelVersion
        fields = [
            "id",
            "url",
            "model",
            "number",
            "label",
            "status",
            "notes",
            "parent",
            "task",
            "pooling",
            "normalize",
            "max_length",
            "quality_threshold",
            "breaking",
            "artifacts",
            "tags",
            "aliases",
            "created_by",
            "created_at",
            "published_at",
        ]
        read_only_fields = ["number", "status", "published_at", "breaking"]
        extra_kwargs = {"notes": {"max_length": MAX_TEXT}}

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "string"}})
    def get_tags(self, version: ModelVersion) -> dict:
        return {tag.key: tag.value for tag in version.tags.all()}

    def validate(self, attrs: dict) -> dict:
        if self.instance is not None and set(attrs) - {"notes"}:
            raise serializers.ValidationError(
                "Only the notes of a version can change; create a new version to change anything else."
            )
        return attrs


class ArtifactUploadSerializer(serializers.Serializer):
    file = serializers.FileField(
        help_text="The ONNX model or tokenizer file; or a GGUF (role source, format gguf) for a generate version."
    )
    role = serializers.ChoiceField(choices=ArtifactRole.choices, default=ArtifactRole.MODEL)
    precision = serializers.ChoiceField(
        choices=Precision.choices, allow_blank=True, default="", help_text="Required for a model file."
    )
    hardware_class = serializers.ChoiceField(choices=HardwareClass.choices, default=HardwareClass.ANY)
    format = serializers.CharField(max_length=16, default="onnx")


class TagsSerializer(serializers.Serializer):
    tags = serializers.ListField(
        child=serializers.CharField(max_length=64, validators=[slug_validator]), allow_empty=True, max_length=100
    )


class CurrentDeploymentSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:deployment-detail")
    version = serializers.CharField(source="version.label", read_only=True)

    class Meta:
        model = Deployment
        fields = ["id", "url", "version", "state", "error", "bytes_done", "bytes_total", "updated_at"]

    def get_attribute(self, device: Device) -> Deployment | None:
        # The viewset prefetches it as a one-item list, so a page of devices costs one query.
        deployments = device.current_deployments  # type: ignore[attr-defined]  # a Prefetch's to_attr
        return deployments[0] if deployments else None


class HardwareSerializer(serializers.ModelSerializer):
    class Meta:
        model = Device
        fields = [
            "hardware_class",
            "arch",
            "os",
            "os_release",
            "cpu_model",
            "cpu_count",
            "cpu_flags",
            "ram_bytes",
            "disk_free_bytes",
            "providers",
            "agent_version",
        ]


class DeviceSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:device-detail", lookup_field="device_id")
    tags = serializers.SerializerMethodField()
    hardware = HardwareSerializer(source="*", read_only=True)
    current_version = BriefVersionSerializer(read_only=True)
    # One nested serializer for the page: building one per device was a third of the page's time.
    current_deployment = CurrentDeploymentSerializer(
        read_only=True,
        allow_null=True,
        help_text="The newest deployment not replaced by another: what the device should run.",
    )

    class Meta:
        model = Device
        fields = [
            "id",
            "url",
            "device_id",
            "name",
            "tags",
            "online",
            "first_seen",
            "last_seen",
            "hardware",
            "current_version",
            "current_deployment",
            "enrollment",
        ]

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_tags(self, device: Device) -> list[str]:
        # The viewset prefetches them into a list: a related manager per device cost more than the query.
        return [tag.name for tag in device.tag_list]  # type: ignore[attr-defined]  # a Prefetch's to_attr


class DeploymentSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:deployment-detail")
    device = serializers.SlugRelatedField(slug_field="device_id", read_only=True)
    version = BriefVersionSerializer(read_only=True)
    artifact_sha256 = serializers.CharField(source="artifact.sha256", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Deployment
        fields = [
            "id",
            "url",
            "device",
            "version",
            "artifact",
            "artifact_sha256",
            "state",
            "error",
            "bytes_done",
            "bytes_total",
            "created_by",
            "created_at",
            "updated_at",
            "downloading_at",
            "verifying_at",
            "active_at",
            "failed_at",
        ]


class AssignSerializer(serializers.Serializer):
    """Devices named by id and devices carrying any of the tags: the union of both."""

    devices = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, default=list, max_length=MAX_NAMED_DEVICES
    )
    tags = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, default=list, max_length=MAX_NAMED_TAGS
    )
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)

    def validate(self, attrs: dict) -> dict:
        ids, tags = set(attrs["devices"]), set(attrs["tags"])
        if not ids and not tags:
            raise serializers.ValidationError("Name at least one device in 'devices' or one tag in 'tags'.")
        targets = list(Device.objects.filter(Q(device_id__in=ids) | Q(tags__name__in=tags)).distinct())
        unknown = sorted(ids - {d.device_id for d in targets})
        if not targets:
            problems = []
            if unknown:
                problems.append(f"no device has the id {', '.join(unknown)}")
            if tags:
                problems.append(f"no device carries the tag {', '.join(sorted(tags))}")
            raise serializers.ValidationError({"devices": f"No device matches: {'; '.join(problems)}."})
        return {**attrs, "targets": targets, "unknown": unknown}


class AssignResultSerializer(serializers.Serializer):
    deployments = DeploymentSerializer(many=True)
    skipped = serializers.DictField(
        child=serializers.CharField(), help_text="Device id -> why the device was not assigned."
    )


class HeartbeatRollupSerializer(serializers.ModelSerializer):
    class Meta:
        model = HeartbeatRollup
        fields = ["hour", "heartbeats", "requests", "errors", "latency_count", "p50_ms", "p95_ms", "p99_ms", "max_ms",
                  "cpu_percent"]  # fmt: skip


class HeartbeatSerializer(serializers.ModelSerializer):
    device = serializers.SlugRelatedField(slug_field="device_id", read_only=True)

    class Meta:
        model = Heartbeat
        fields = [
            "id",
            "device",
            "received_at",
            "sent_at",
            "seq",
            "uptime_s",
            "cpu_percent",
            "mem_rss_bytes",
            "mem_available_bytes",
            "deployment_id_reported",
            "active_sha256",
            "requests",
            "errors",
            "latency_count",
            "p50_ms",
            "p95_ms",
            "p99_ms",
            "max_ms",
            "gen_requests",
            "gen_errors",
            "gen_tokens",
            "ttft_p50_ms",
            "ttft_p95_ms",
            "decode_tps_p50",
        ]


class AuditEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "actor",
            "actor_label",
            "action",
            "object_type",
            "object_id",
            "object_repr",
            "before",
            "after",
            "reason",
            "source_address",
        ]


# --- Rollouts ----------------------------------------------------------------------


@extend_schema_serializer(deprecate_fields=["devices"])
class RolloutStageSerializer(serializers.ModelSerializer):
    """A stage's size is cumulative: how many selected devices run the version once it is reached.

    It only reshapes: the stage rules are the domain's (RolloutStage.clean, fleet/services/stages.py).
    """

    percent = serializers.DecimalField(
        max_digits=5, decimal_places=2, required=False, allow_null=True, help_text="Share of the selected fleet."
    )
    device_count = serializers.IntegerField(required=False, allow_null=True, help_text="Or a count of devices.")
    # The name device_count had until issue #17: in the same request `selector.devices` is a list of ids.
    devices = serializers.IntegerField(
        required=False,
        allow_null=True,
        write_only=True,
        help_text="Deprecated: the former name of `device_count`, still accepted in a request. "
        "Answers carry `device_count` only.",
    )

    class Meta:
        model = RolloutStage
        fields = [
            "index",
            "name",
            "percent",
            "device_count",
            "devices",
            "min_soak_seconds",
            "success_percent",
            "failure_percent",
            "failure_min_finished",
            "health_p95_ratio",
            "health_error_points",
            "health_min_samples",
            "health_ttft_ratio",
            "health_tps_ratio",
            "inconclusive_timeout",
            "inconclusive_action",
            "started_at",
            "passed_at",
            "held_since",
            "hold_expired_at",
        ]
        read_only_fields = ["index", "started_at", "passed_at", "held_since", "hold_expired_at"]
        extra_kwargs = {
            "health_p95_ratio": {"help_text": "Health gate on when set: p95 at most this × the baseline's."},
            "health_ttft_ratio": {
                "help_text": "Generation gate (generative models): time to first token p95 at most this × the "
                "baseline's."
            },
            "health_tps_ratio": {
                "help_text": "Generation gate (generative models): decode tokens/s at least this × the baseline's."
            },
        }

    def validate(self, attrs: dict) -> dict:
        """Only reshapes: the deprecated ``devices`` becomes ``device_count``."""
        devices = attrs.pop("devices", None)
        if devices is None:
            return attrs
        if attrs.get("device_count") is not None:
            raise serializers.ValidationError(
                {"devices": "Give 'device_count' alone: 'devices' is its deprecated former name."}
            )
        return {**attrs, "device_count": devices}


class RolloutSelectorSerializer(serializers.Serializer):
    # A tag's rules (a slug of at most 64 characters) are the domain's (Rollout.clean), for every caller.
    tags = serializers.ListField(
        child=serializers.CharField(),
        required=False,
        default=list,
        max_length=MAX_NAMED_TAGS,
        help_text="Tags act as device groups.",
    )
    devices = serializers.ListField(
        child=serializers.CharField(max_length=64), required=False, default=list, max_length=MAX_NAMED_DEVICES
    )
    hardware_class = serializers.ChoiceField(
        choices=HardwareClass.choices, required=False, allow_blank=True, default=""
    )


@extend_schema_field(OpenApiTypes.STR)
class AliasRefField(serializers.RelatedField):
    """An alias written ``model:alias``, e.g. ``minilm-embedder:stable``."""

    default_error_messages = {"missing": "{value!r} names no alias: write model:alias."}

    def __init__(self, **kwargs):
        kwargs.setdefault("queryset", Alias.objects.select_related("model", "version__model"))
        super().__init__(**kwargs)

    def to_internal_value(self, data):
        name, _, alias = str(data).rpartition(":")
        found = self.get_queryset().filter(model__name=name, name=alias).first()
        if found is None:
            self.fail("missing", value=data)
        return found

    def to_representation(self, value) -> str:
        return str(value)


class RolloutSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:rollout-detail")
    progress_url = IdentityUrlField(view_name="api:rollout-progress")
    version = serializers.PrimaryKeyRelatedField(
        queryset=ModelVersion.objects.filter(status=VersionStatus.PUBLISHED),
        required=False,
        error_messages={
            "does_not_exist": "Version {pk_value} is not published (or does not exist): only a "
            "published version can be rolled out."
        },
        help_text="A published version; or give `alias` instead. With an alias, the version it names "
        "when the rollout starts.",
    )
    alias = AliasRefField(
        required=False,
        allow_null=True,
        help_text="`model:alias` to follow, e.g. `minilm-embedder:stable`: resolved again when the rollout starts.",
    )
    version_label = serializers.CharField(source="version.label", read_only=True)
    selector = serializers.SerializerMethodField()
    # Bounds what one request makes the plane parse; the rule itself is the domain's (services/stages.py).
    stages = RolloutStageSerializer(  # type: ignore[call-arg]  # many=True passes max_length on
        many=True, max_length=MAX_STAGES
    )
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Rollout
        fields = [
            "id",
            "url",
            "progress_url",
            "name",
            "version",
            "alias",
            "version_label",
            "state",
            "selector",
            "baseline",
            "max_per_minute",
            "current_stage",
            "stage_started_at",
            "soak_skipped",
            "stages",
            "reason",
            "gates",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = [
            "state",
            "current_stage",
            "stage_started_at",
            "soak_skipped",
            "reason",
            "gates",
            "started_at",
            "finished_at",
        ]

    @extend_schema_field(RolloutSelectorSerializer)
    def get_selector(self, rollout: Rollout) -> dict:
        return {
            "tags": rollout.selector_tags,
            "devices": rollout.selector_device_ids,
            "hardware_class": rollout.selector_hardware_class,
        }


class RolloutCreateSerializer(RolloutSerializer):
    selector = RolloutSelectorSerializer()  # type: ignore[assignment]  # written nested, read as a method

    def to_representation(self, rollout: Rollout) -> dict:
        return RolloutSerializer(rollout, context=self.context).data

    def validate(self, attrs: dict) -> dict:
        if not attrs.get("version") and not attrs.get("alias"):
            raise serializers.ValidationError("Give the rollout a 'version' or an 'alias'.")
        return attrs

    def service_arguments(self) -> dict:
        """The request as ``rollouts.create_rollout``'s arguments, which checks the rules of rollouts and stages."""
        fields = dict(self.validated_data)
        selector = fields.pop("selector")
        return {
            "version": fields.pop("version", None),
            "stages": [dict(stage) for stage in fields.pop("stages")],
            "tags": selector["tags"],
            "device_ids": selector["devices"],
            "hardware_class": selector["hardware_class"],
            **fields,
        }


class RolloutActionSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)


class RolloutStartSerializer(RolloutActionSerializer):
    supersede = serializers.BooleanField(
        default=False, help_text="Abort any running or paused rollout that has some of the selected devices."
    )


class StageCountsSerializer(serializers.Serializer):
    targeted = serializers.IntegerField()
    pending = serializers.IntegerField()
    downloading = serializers.IntegerField()
    verifying = serializers.IntegerField()
    active = serializers.IntegerField()
    failed = serializers.IntegerField()
    rolled_back = serializers.IntegerField()
    ineligible = serializers.IntegerField()
    sent_back = serializers.IntegerField(help_text="Sent back to their previous version by the rollout's rollback.")


class GateSerializer(serializers.Serializer):
    gate = serializers.CharField()
    verdict = serializers.ChoiceField(choices=["pass", "fail", "inconclusive", "waiting"])
    value = serializers.FloatField(allow_null=True)
    threshold = serializers.FloatField(allow_null=True)
    detail = serializers.CharField()


class StageHoldSerializer(serializers.Serializer):
    since = serializers.DateTimeField()
    deadline = serializers.DateTimeField(help_text="When `inconclusive_action` applies.")
    expired_at = serializers.DateTimeField(allow_null=True, help_text="Set once the hold ran past its deadline.")
    action = serializers.CharField()
    reason = serializers.CharField()


class StageDeviceSerializer(serializers.Serializer):
    device = serializers.CharField()
    state = serializers.CharField(help_text="Its deployment's state, or ineligible.")
    error = serializers.CharField(help_text="The device's own error, or why it is ineligible.")
    sent_back = serializers.BooleanField(help_text="The rollout's rollback gave it its previous version.")


class StageProgressSerializer(serializers.Serializer):
    index = serializers.IntegerField(source="stage.index")
    name = serializers.CharField(source="stage.__str__")
    size = serializers.CharField(source="stage.size_label")
    planned = serializers.IntegerField(help_text="Devices this stage adds, for the fleet selected now.")
    status = serializers.CharField(
        help_text="pending, running, held (an inconclusive gate after the soak), held_past_deadline, paused, "
        "passed, or the rollout's final state."
    )
    hold = StageHoldSerializer(allow_null=True, help_text="Set while an inconclusive gate holds the stage.")
    started_at = serializers.DateTimeField(source="stage.started_at", allow_null=True)
    passed_at = serializers.DateTimeField(source="stage.passed_at", allow_null=True)
    soak_remaining_s = serializers.FloatField(source="progress.soak_remaining_s", allow_null=True)
    counts = StageCountsSerializer(source="progress.counts")
    gates = GateSerializer(source="progress.gates", many=True)
    canary = StageDeviceSerializer(many=True, help_text="The first stage's first 5 devices; empty for the others.")
    failing = StageDeviceSerializer(many=True, help_text="Its failed devices with their errors (20 at most).")


class RolloutProgressSerializer(serializers.Serializer):
    id = serializers.IntegerField(source="rollout.pk")
    state = serializers.CharField(source="rollout.state")
    done = serializers.BooleanField(help_text="True once the rollout is completed, aborted or rolled back.")
    current_stage = serializers.IntegerField(source="rollout.current_stage")
    fleet = serializers.IntegerField(help_text="Devices selected (or reached) by the rollout.")
    reason = serializers.CharField(source="rollout.reason")
    stages = StageProgressSerializer(many=True)


# --- Model pipeline --------------------------------------------------------------------


class OptimizeSerializer(serializers.Serializer):
    variants = serializers.ListField(
        child=serializers.ChoiceField(choices=["int8", "int4", "fp16", "repack"]),
        required=False,
        allow_empty=False,
        help_text="Which variants to build from the version's fp32 artifact (int8, int4, fp16; the default "
        "is all three) or, for a generate version, from its GGUF source (repack, int4, int8; all three).",
    )
    int4_block_size = serializers.ChoiceField(choices=[16, 32, 64, 128, 256], default=32)


class PipelineStepSerializer(serializers.ModelSerializer):
    class Meta:
        model = PipelineStep
        fields = ["id", "kind", "state", "progress", "artifact", "error", "started_at", "finished_at"]


class PipelineSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:pipeline-detail")
    version = BriefVersionSerializer(read_only=True)
    steps = PipelineStepSerializer(many=True, read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = Pipeline
        fields = [
            "id",
            "url",
            "version",
            "source",
            "state",
            "options",
            "error",
            "steps",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]


class VariantPinSerializer(serializers.ModelSerializer):
    url = IdentityUrlField(view_name="api:variantpin-detail")
    device = NameField(slug_field="device_id", queryset=Device.objects.all(), required=False, allow_null=True)
    tag = NameField(slug_field="name", queryset=Tag.objects.all(), required=False, allow_null=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta:
        model = VariantPin
        fields = ["id", "url", "version", "artifact", "device", "tag", "reason", "created_by", "created_at"]
        # The model's constraints are checked by the service's full_clean; DRF's own unique-together
        # validators would make device and tag both required.
        validators: list = []
        read_only_fields = ["version"]


class AliasSerializer(serializers.ModelSerializer):
    model = serializers.CharField(source="model.name", read_only=True)
    version_label = serializers.CharField(source="version.label", read_only=True)

    class Meta:
        model = Alias
        fields = ["name", "model", "version", "version_label", "updated_at"]
        read_only_fields = fields


class AliasMoveSerializer(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_label", read_only=True)

    class Meta:
        model = AliasMove
        fields = ["id", "from_version", "from_label", "to_version", "to_label", "actor", "reason", "moved_at"]
        read_only_fields = fields


class MoveAliasSerializer(serializers.Serializer):
    version = serializers.PrimaryKeyRelatedField(
        queryset=ModelVersion.objects.select_related("model"), help_text="The published version to point at."
    )
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)
    expected_version = serializers.PrimaryKeyRelatedField(
        queryset=ModelVersion.objects.all(),
        required=False,
        allow_null=True,
        help_text="Move only if the alias points at this version now (null: only if it does not exist yet).",
    )


# Not "VersionTags": generators name Version's inline `tags` object that, and drop Version as a duplicate.
@extend_schema_serializer(component_name="VersionTagsRequest")
class VersionTagsSerializer(serializers.Serializer):
    tags = serializers.DictField(
        child=serializers.CharField(max_length=200, allow_blank=True),
        help_text="Every tag of the version, key to value (a label alone: an empty value); replaces them all.",
    )

    def validate_tags(self, tags: dict) -> dict:
        if len(tags) > 50:
            raise serializers.ValidationError("At most 50 tags.")
        return tags


class RetentionSerializer(serializers.Serializer):
    reason = serializers.CharField(required=False, allow_blank=True, default="", max_length=2000)


class SigningKeySerializer(serializers.Serializer):
    algorithm = serializers.CharField()
    public_key = serializers.CharField(help_text="Base64 of the 32 raw bytes: the agents' security.plane_public_key.")


# --- Enrollment ------------------------------------------------------------------------


class EnrollmentTokenSerializer(serializers.ModelSerializer):
    """A token as listed: never its secret, which only the create answer shows, once."""

    url = IdentityUrlField(view_name="api:enrollmenttoken-detail")
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    device_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = EnrollmentToken
        fields = [
            "id",
            "url",
            "name",
            "prefix",
            "expires_at",
            "revoked_at",
            "auto_approve",
            "max_devices",
            "device_count",
            "created_by",
            "created_at",
        ]
        read_only_fields = ["prefix", "expires_at", "revoked_at"]


class EnrollmentTokenCreateSerializer(EnrollmentTokenSerializer):
    expires_in_hours = serializers.IntegerField(min_value=1, max_value=24 * 365, default=24, write_only=True)
    token = serializers.CharField(read_only=True, help_text="The secret: shown in this answer only.")

    class Meta(EnrollmentTokenSerializer.Meta):
        fields = [*EnrollmentTokenSerializer.Meta.fields, "expires_in_hours", "token"]


class EnrollSerializer(serializers.Serializer):
    token = serializers.CharField(max_length=100)
    device_id = serializers.CharField(max_length=64, validators=[device_id_validator])
    public_key = serializers.CharField(max_length=64, help_text="Ed25519 public key: raw 32 bytes in base64.")
    name = serializers.CharField(max_length=200, required=False, allow_blank=True, default="")


class EnrollmentStatusSerializer(serializers.Serializer):
    device_id = serializers.CharField()
    state = serializers.ChoiceField(choices=EnrollmentState.choices)


class CredentialsRequestSerializer(serializers.Serializer):
    timestamp_ms = serializers.IntegerField(min_value=0, max_value=2**53)
    signature = serializers.CharField(max_length=100, help_text="Ed25519 signature, base64, of the signed message.")


class CredentialsSerializer(EnrollmentStatusSerializer):
    username = serializers.CharField(allow_null=True)
    password = serializers.CharField(allow_null=True)
    broker_url = serializers.CharField(allow_null=True)
