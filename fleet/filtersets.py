"""Query filters of the API's list endpoints; devices are always named by their string id."""

from datetime import UTC

import django_filters as filters
from django.core.exceptions import ValidationError
from django_filters.fields import IsoDateTimeField

from fleet.choices import ArtifactRole, ArtifactStatus, DeploymentState, HardwareClass, RolloutState, VersionStatus
from fleet.models import Artifact, AuditEvent, Deployment, Device, Heartbeat, Model, ModelVersion, Rollout


class UtcDateTimeField(IsoDateTimeField):
    """An ISO 8601 time, in UTC: PostgreSQL refuses offsets past ±15:59, which ISO allows."""

    def to_python(self, value):
        parsed = super().to_python(value)
        try:
            return parsed.astimezone(UTC) if parsed is not None else None
        except OverflowError:
            raise ValidationError("The time is out of range.", code="invalid") from None


class UtcDateTimeFilter(filters.IsoDateTimeFilter):
    field_class = UtcDateTimeField


class RegistryModelFilterSet(filters.FilterSet):
    name = filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = Model
        fields = ["name"]


class VersionFilterSet(filters.FilterSet):
    model = filters.CharFilter(field_name="model__name")
    status = filters.ChoiceFilter(choices=VersionStatus.choices)
    tag = filters.CharFilter(method="filter_tag", label="Tag: key, or key=value")

    def filter_tag(self, queryset, name, value):
        key, sep, tag_value = value.partition("=")
        match = {"tags__key": key, **({"tags__value": tag_value} if sep else {})}
        return queryset.filter(**match).distinct()

    class Meta:
        model = ModelVersion
        fields = ["model", "status", "number", "parent", "task"]


class ArtifactFilterSet(filters.FilterSet):
    role = filters.ChoiceFilter(choices=ArtifactRole.choices)
    status = filters.ChoiceFilter(choices=ArtifactStatus.choices)
    model = filters.CharFilter(field_name="version__model__name")

    class Meta:
        model = Artifact
        fields = ["version", "role", "status", "sha256", "precision", "hardware_class", "model"]


class DeviceFilterSet(filters.FilterSet):
    # No DISTINCT: a device carries a tag once, so the join gives one row per device. DISTINCT over
    # every column (two of them JSON) made a tag's page and its count sort the whole fleet.
    tag = filters.CharFilter(field_name="tags__name")
    hardware_class = filters.ChoiceFilter(choices=HardwareClass.choices)
    # What the device runs now, by version id or by model name.
    current_version = filters.NumberFilter(field_name="current_version")
    model = filters.CharFilter(field_name="current_version__model__name")

    class Meta:
        model = Device
        fields = ["tag", "online", "hardware_class", "arch", "os", "current_version", "model"]


class DeploymentFilterSet(filters.FilterSet):
    device = filters.CharFilter(field_name="device__device_id")
    state = filters.ChoiceFilter(choices=DeploymentState.choices)
    # The rollout's own deployments of its version (not the ones its rollback made).
    rollout = filters.NumberFilter(field_name="rollout_member__rollout")

    class Meta:
        model = Deployment
        fields = ["device", "state", "version", "rollout"]


class HeartbeatFilterSet(filters.FilterSet):
    device = filters.CharFilter(field_name="device__device_id")
    since = UtcDateTimeFilter(field_name="received_at", lookup_expr="gte")

    class Meta:
        model = Heartbeat
        fields = ["device", "since"]


class AuditEventFilterSet(filters.FilterSet):
    since = UtcDateTimeFilter(field_name="created_at", lookup_expr="gte")

    class Meta:
        model = AuditEvent
        fields = ["action", "object_type", "object_id", "actor_label", "since"]


class RolloutFilterSet(filters.FilterSet):
    state = filters.ChoiceFilter(choices=RolloutState.choices)
    model = filters.CharFilter(field_name="version__model__name")

    class Meta:
        model = Rollout
        fields = ["state", "version", "model"]
