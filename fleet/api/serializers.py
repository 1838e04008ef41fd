"""API representations. They reshape and validate; the services change state."""

from django.db.models import Q
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from agent.manifest import chunk_count
from fleet.choices import ArtifactRole, HardwareClass, Precision
from fleet.models import (
    Artifact,
    AuditEvent,
    Deployment,
    Device,
    Heartbeat,
    Model,
    ModelVersion,
    slug_validator,
)


class RegistryModelSerializer(serializers.ModelSerializer):
    """A model of the registry (named so as not to read as DRF's ModelSerializer)."""

    url = serializers.HyperlinkedIdentityField(view_name="api:model-detail", lookup_field="name")
    version_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Model
        fields = ["id", "url", "name", "description", "version_count", "created_at"]


class BriefVersionSerializer(serializers.ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api:version-detail")
    model = serializers.CharField(source="model.name", read_only=True)

    class Meta:
        model = ModelVersion
        fields = ["id", "url", "label", "model", "number", "status"]


class BriefArtifactSerializer(serializers.ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api:artifact-detail")
    chunk_count = serializers.SerializerMethodField()

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
            "created_at",
        ]

    def get_chunk_count(self, artifact: Artifact) -> int:
        return chunk_count(artifact.size, artifact.chunk_size) if artifact.chunk_size else 0


class ArtifactSerializer(BriefArtifactSerializer):
    """The whole artifact, with the chunk hashes an agent checks each chunk against."""

    version_label = serializers.CharField(source="version.label", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)

    class Meta(BriefArtifactSerializer.Meta):
        fields = [*BriefArtifactSerializer.Meta.fields, "version_label", "chunk_hashes", "created_by"]


class VersionSerializer(serializers.ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api:version-detail")
    model = serializers.SlugRelatedField(slug_field="name", queryset=Model.objects.all())
    parent = serializers.PrimaryKeyRelatedField(queryset=ModelVersion.objects.all(), required=False, allow_null=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    artifacts = BriefArtifactSerializer(many=True, read_only=True)

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
            "artifacts",
            "created_by",
            "created_at",
            "published_at",
        ]
        read_only_fields = ["number", "status", "published_at"]

    def validate(self, attrs: dict) -> dict:
        if self.instance is not None and set(attrs) - {"notes"}:
            raise serializers.ValidationError(
                "Only the notes of a version can change; create a new version to change anything else."
            )
        return attrs


class ArtifactUploadSerializer(serializers.Serializer):
    file = serializers.FileField(help_text="The ONNX model or tokenizer file.")
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
    url = serializers.HyperlinkedIdentityField(view_name="api:deployment-detail")
    version = serializers.CharField(source="version.label", read_only=True)

    class Meta:
        model = Deployment
        fields = ["id", "url", "version", "state", "error", "bytes_done", "bytes_total", "updated_at"]


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
    url = serializers.HyperlinkedIdentityField(view_name="api:device-detail", lookup_field="device_id")
    tags = serializers.SlugRelatedField(slug_field="name", many=True, read_only=True)
    hardware = HardwareSerializer(source="*", read_only=True)
    current_version = BriefVersionSerializer(read_only=True)
    current_deployment = serializers.SerializerMethodField(
        help_text="The newest deployment not replaced by another: what the device should run."
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
        ]

    @extend_schema_field(CurrentDeploymentSerializer(allow_null=True))
    def get_current_deployment(self, device: Device) -> dict | None:
        # The viewset prefetches it as a one-item list, so a page of devices costs one query.
        deployments = device.current_deployments
        if not deployments:
            return None
        return CurrentDeploymentSerializer(deployments[0], context=self.context).data


class DeploymentSerializer(serializers.ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name="api:deployment-detail")
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

    devices = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)
    reason = serializers.CharField(required=False, allow_blank=True, default="")

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
