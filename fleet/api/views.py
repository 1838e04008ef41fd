"""The REST API: each viewset names its queryset, serializer and filters; actions call one service."""

import logging
from datetime import timedelta

from django.conf import settings
from django.db import connection
from django.db.models import Count, Prefetch
from django.http import Http404
from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.authtoken.views import ObtainAuthToken
from rest_framework.decorators import action, api_view, permission_classes
from rest_framework.exceptions import Throttled
from rest_framework.generics import GenericAPIView
from rest_framework.parsers import FormParser, MultiPartParser
from rest_framework.permissions import AllowAny
from rest_framework.response import Response

from fleet import auth, filtersets, signing
from fleet.api import serializers
from fleet.choices import DeploymentState, EnrollmentState, InferenceTask
from fleet.http import ClientScopedRateThrottle, request_address
from fleet.models import (
    Alias,
    Artifact,
    AuditEvent,
    Deployment,
    Device,
    EnrollmentToken,
    Heartbeat,
    Model,
    ModelVersion,
    Pipeline,
    Rollout,
    VariantPin,
)
from fleet.services import (
    aliases,
    assignments,
    devices,
    enrollment,
    generative,
    pipeline,
    registry,
    retention,
    rollouts,
)
from fleet.storage import TooLarge

log = logging.getLogger(__name__)

# Multipart framing around an uploaded file; the store enforces the exact limit.
_UPLOAD_OVERHEAD_BYTES = 64 * 1024


class RegistryModelViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    queryset = Model.objects.annotate(version_count=Count("versions"))
    serializer_class = serializers.RegistryModelSerializer
    filterset_class = filtersets.RegistryModelFilterSet
    lookup_field = "name"
    lookup_value_regex = r"[^/]+"

    def perform_create(self, serializer):
        serializer.instance = registry.create_model(**serializer.validated_data, actor=self.request.user)
        serializer.instance.version_count = 0


class AliasViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """``/models/{model_name}/aliases/{name}/``: read an alias, or move it with PUT."""

    serializer_class = serializers.AliasSerializer
    lookup_field = "name"
    lookup_value_regex = r"[^/]+"
    http_method_names = ["get", "put", "head", "options"]
    filter_backends = []
    pagination_class = None

    def get_queryset(self):
        return Alias.objects.select_related("model", "version__model").filter(model__name=self.kwargs.get("model_name"))

    @extend_schema(
        request=serializers.MoveAliasSerializer,
        responses=serializers.AliasSerializer,
        description="Point the alias at a published version of this model, creating it if new; every move "
        "is kept in its history. With `expected_version`, only if it still points there (else 409).",
    )
    def update(self, request, model_name=None, name=None):
        model = get_object_or_404(Model, name=model_name)
        body = serializers.MoveAliasSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        fields = dict(body.validated_data)
        aliases.move_alias(
            model,
            name,
            fields["version"],
            actor=request.user,
            reason=fields["reason"],
            expected=fields.get("expected_version"),
            check_expected="expected_version" in fields,
        )
        return Response(self.get_serializer(self.get_queryset().get(name=name)).data)

    @extend_schema(responses=serializers.AliasMoveSerializer(many=True))
    @action(detail=True, methods=["get"])
    def history(self, request, model_name=None, name=None):
        return Response(serializers.AliasMoveSerializer(self.get_object().moves.all(), many=True).data)


class VersionViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    queryset = ModelVersion.objects.select_related("model", "created_by").prefetch_related(
        Prefetch("artifacts", queryset=Artifact.objects.defer("chunk_hashes", "chunk_lengths")), "tags", "aliases"
    )
    serializer_class = serializers.VersionSerializer
    filterset_class = filtersets.VersionFilterSet
    http_method_names = ["get", "post", "put", "patch", "delete", "head", "options"]
    # Besides its id, a version is named "model:number" or "model:alias" (e.g. minilm:stable).
    lookup_value_regex = r"[^/]+"
    action_permissions = {
        "tags": ["fleet.change_modelversion"],
        "archive": ["fleet.change_modelversion"],
        "publish": ["fleet.change_modelversion"],
        "artifacts": ["fleet.change_modelversion"],
        "optimize": ["fleet.change_modelversion"],
        "assign": ["fleet.add_deployment"],
    }

    def perform_create(self, serializer):
        fields = dict(serializer.validated_data)
        serializer.instance = registry.create_version(fields.pop("model"), actor=self.request.user, **fields)

    def get_object(self):
        ref = self.kwargs.get("pk", "")
        if ":" in ref:
            try:
                self.kwargs["pk"] = str(aliases.resolve_label(ref).pk)
            except aliases.AliasNotFound:
                raise Http404 from None
        elif not ref.isdigit():
            raise Http404
        return super().get_object()

    def update(self, request, *args, **kwargs):
        if not kwargs.get("partial"):
            return Response({"detail": "Use PATCH to change a version's notes."}, status.HTTP_405_METHOD_NOT_ALLOWED)
        return super().update(request, *args, **kwargs)

    @extend_schema(
        parameters=[OpenApiParameter("reason", OpenApiTypes.STR, description="Why, for the audit log.")],
        description="Delete a version nothing runs, takes or names, with its artifacts; each file leaves the "
        "store unless another artifact shares it. A version with deployment or rollout history is refused "
        "(409): archive it instead.",
    )
    def destroy(self, request, *args, **kwargs):
        version = self.get_object()
        retention.delete_version(version, actor=request.user, reason=request.query_params.get("reason", ""))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        request=serializers.RetentionSerializer,
        responses=serializers.VersionSerializer,
        description="Retire a published version nothing runs, takes or names: it is never offered again; "
        "its files are kept. Refused with the reasons (409) otherwise.",
    )
    @action(detail=True, methods=["post"])
    def archive(self, request, pk=None):
        body = serializers.RetentionSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        version = retention.archive_version(self.get_object(), actor=request.user, **body.validated_data)
        return Response(self.get_serializer(self.get_queryset().get(pk=version.pk)).data)

    @extend_schema(request=serializers.VersionTagsSerializer, responses=serializers.VersionSerializer)
    @action(detail=True, methods=["put"])
    def tags(self, request, pk=None):
        body = serializers.VersionTagsSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        version = registry.set_version_tags(self.get_object(), body.validated_data["tags"], actor=request.user)
        return Response(self.get_serializer(self.get_queryset().get(pk=version.pk)).data)

    def perform_update(self, serializer):
        notes = serializer.validated_data.get("notes", serializer.instance.notes)
        serializer.instance = registry.update_version_notes(serializer.instance, notes=notes, actor=self.request.user)

    @extend_schema(request=None, responses=serializers.VersionSerializer)
    @action(detail=True, methods=["post"])
    def publish(self, request, pk=None):
        version = registry.publish_version(self.get_object(), actor=request.user)
        return Response(self.get_serializer(self.get_queryset().get(pk=version.pk)).data)

    @extend_schema(
        request={"multipart/form-data": serializers.ArtifactUploadSerializer},
        responses={201: serializers.ArtifactSerializer},
        description="Upload one file of a draft version. The artifact is `processing` until its hashes "
        "are computed; poll its `url` until it is `ready` or `failed`.",
    )
    @action(detail=True, methods=["post"], parser_classes=[MultiPartParser, FormParser])
    def artifacts(self, request, pk=None):
        # Refuse an oversize upload before Django spools it to disk.
        if int(request.META.get("CONTENT_LENGTH") or 0) > settings.ARTIFACT_MAX_BYTES + _UPLOAD_OVERHEAD_BYTES:
            raise TooLarge(f"the file is over the {settings.ARTIFACT_MAX_BYTES}-byte limit")
        version = self.get_object()
        upload = serializers.ArtifactUploadSerializer(data=request.data)
        upload.is_valid(raise_exception=True)
        fields = dict(upload.validated_data)
        file = fields.pop("file")
        artifact = registry.add_artifact(version, file, filename=file.name, actor=request.user, **fields)
        # Processing may already have run on commit (eager Celery): show where it got to.
        artifact.refresh_from_db()
        data = serializers.ArtifactSerializer(artifact, context=self.get_serializer_context()).data
        return Response(
            data, status=status.HTTP_201_CREATED, headers={"Location": str(data["url"])}
        )  # wsgiref wants a str, not a Hyperlink

    @extend_schema(
        request=serializers.OptimizeSerializer,
        responses={202: serializers.PipelineSerializer},
        description="Build variants (int8, int4, fp16) of the draft's fp32 artifact, evaluate each against "
        "fp32 on the version's evaluation set and reject those below its quality threshold. Poll the "
        "pipeline's `url` for progress.",
    )
    @action(detail=True, methods=["post"])
    def optimize(self, request, pk=None):
        options = serializers.OptimizeSerializer(data=request.data)
        options.is_valid(raise_exception=True)
        version = self.get_object()
        if version.task == InferenceTask.GENERATE:
            variants = options.validated_data.get("variants")
            started = generative.start_pipeline(
                version, source=generative.gguf_source(version), actor=request.user, variants=variants
            )
        else:
            started = pipeline.start_pipeline(version, actor=request.user, **options.validated_data)
        data = serializers.PipelineSerializer(
            Pipeline.objects.get(pk=started.pk), context=self.get_serializer_context()
        ).data
        return Response(data, status=status.HTTP_202_ACCEPTED, headers={"Location": str(data["url"])})

    @extend_schema(request=serializers.AssignSerializer, responses={201: serializers.AssignResultSerializer})
    @action(detail=True, methods=["post"])
    def assign(self, request, pk=None):
        version = self.get_object()
        selection = serializers.AssignSerializer(data=request.data)
        selection.is_valid(raise_exception=True)
        result = assignments.assign_version(
            version,
            selection.validated_data["targets"],
            actor=request.user,
            reason=selection.validated_data["reason"],
            source_address=request_address(request),
        )
        skipped = {device_id: "no device has this id" for device_id in selection.validated_data["unknown"]}
        data = {"deployments": result.deployments, "skipped": {**skipped, **result.skipped}}
        context = self.get_serializer_context()
        return Response(serializers.AssignResultSerializer(data, context=context).data, status=status.HTTP_201_CREATED)


class ArtifactViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Artifact.objects.select_related("version__model", "created_by", "evaluation")
    filterset_class = filtersets.ArtifactFilterSet

    def get_serializer_class(self):
        return serializers.ArtifactSerializer if self.action == "retrieve" else serializers.BriefArtifactSerializer

    def get_queryset(self):
        queryset = super().get_queryset()
        # A 2 GB file has 8192 chunk hashes: lists leave them out.
        return queryset if self.action == "retrieve" else queryset.defer("chunk_hashes", "chunk_lengths")


class DeviceViewSet(viewsets.ReadOnlyModelViewSet):
    # A page is one query for its devices, one for their tags and one for their current deployments.
    # Tags as a list (to_attr): a related manager per device cost more than the query. (Not an ARRAY
    # subquery: PostgreSQL runs it for every row OFFSET skips.) The current deployment is the newest
    # not superseded: DISTINCT ON per device, cheaper to build and run than a sliced prefetch's
    # window function, with only the fields the page shows.
    queryset = Device.objects.select_related("current_version__model")
    current_deployments = (
        Deployment.objects.exclude(state=DeploymentState.SUPERSEDED)
        .select_related("version__model")
        .only(
            "device",
            "state",
            "error",
            "bytes_done",
            "bytes_total",
            "updated_at",
            "version__number",
            "version__model__name",
        )
        .order_by("device_id", "-id")
    )
    serializer_class = serializers.DeviceSerializer
    filterset_class = filtersets.DeviceFilterSet
    lookup_field = "device_id"
    lookup_value_regex = r"[^/]+"

    def get_queryset(self):
        # DISTINCT ON is PostgreSQL's; elsewhere (the demo's SQLite) every open deployment
        # comes, newest first, and the serializer takes the first.
        current = self.current_deployments
        if connection.vendor == "postgresql":
            current = current.distinct("device_id")
        return (
            super()
            .get_queryset()
            .prefetch_related(
                Prefetch("tags", to_attr="tag_list"), Prefetch("deployments", current, "current_deployments")
            )
        )

    action_permissions = {
        "tags": ["fleet.change_device"],
        "accept": ["fleet.change_device"],
        "reject": ["fleet.change_device"],
        "decommission": ["fleet.change_device"],
        "heartbeats": ["fleet.view_device", "fleet.view_heartbeat"],
        "history": ["fleet.view_device", "fleet.view_heartbeatrollup"],
    }

    @extend_schema(request=serializers.TagsSerializer, responses=serializers.DeviceSerializer)
    @action(detail=True, methods=["put"])
    def tags(self, request, device_id=None):
        device = self.get_object()
        names = serializers.TagsSerializer(data=request.data)
        names.is_valid(raise_exception=True)
        devices.set_tags(device, names.validated_data["tags"], actor=request.user)
        return Response(self.get_serializer(self.get_queryset().get(pk=device.pk)).data)

    def _verdict(self, request, service):
        device = service(self.get_object(), actor=request.user)
        return Response(self.get_serializer(self.get_queryset().get(pk=device.pk)).data)

    @extend_schema(request=None, responses=serializers.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def accept(self, request, device_id=None):
        """Accept a pending (or rejected) device: it may fetch its broker credentials."""
        return self._verdict(request, enrollment.accept_device)

    @extend_schema(request=None, responses=serializers.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def reject(self, request, device_id=None):
        return self._verdict(request, enrollment.reject_device)

    @extend_schema(request=None, responses=serializers.DeviceSerializer)
    @action(detail=True, methods=["post"])
    def decommission(self, request, device_id=None):
        """Take the device out of the fleet: its broker login is removed and the broker disconnects it."""
        return self._verdict(request, enrollment.decommission_device)

    @extend_schema(
        parameters=[OpenApiParameter("limit", OpenApiTypes.INT, description="How many, newest first (at most 1000).")],
        responses=serializers.HeartbeatSerializer(many=True),
    )
    @action(detail=True, methods=["get"], filter_backends=[], pagination_class=None)
    def heartbeats(self, request, device_id=None):
        device = self.get_object()
        try:
            limit = min(max(int(request.query_params.get("limit", 50)), 1), 1000)
        except ValueError:
            limit = 50
        beats = device.heartbeats.order_by("-received_at")[:limit]
        for beat in beats:
            beat.device = device  # the serializer names it; no need to load it again per row
        return Response(serializers.HeartbeatSerializer(beats, many=True).data)

    @extend_schema(
        parameters=[OpenApiParameter("hours", OpenApiTypes.INT, description="How many hours back (at most 24 x 400).")],
        responses=serializers.HeartbeatRollupSerializer(many=True),
    )
    @action(detail=True, methods=["get"], filter_backends=[], pagination_class=None)
    def history(self, request, device_id=None):
        """The device's heartbeats hour by hour, newest first: rollups, kept longer than the raw heartbeats."""
        device = self.get_object()
        try:
            hours = min(max(int(request.query_params.get("hours", 48)), 1), 24 * 400)
        except ValueError:
            hours = 48
        since = timezone.now() - timedelta(hours=hours)
        rollups = device.rollups.filter(hour__gte=since).order_by("-hour")
        return Response(serializers.HeartbeatRollupSerializer(rollups, many=True).data)


class DeploymentViewSet(viewsets.ReadOnlyModelViewSet):
    # Of the related rows, only what the serializer shows: whole devices, artifacts and users were
    # most of a page's time (JSON columns decoded, chunk hashes, password hashes).
    queryset = Deployment.objects.select_related("device", "version__model", "artifact", "created_by").only(
        *(f.name for f in Deployment._meta.concrete_fields),
        "device__device_id",
        "version__number",
        "version__status",
        "version__model__name",
        "artifact__sha256",
        "created_by__username",
    )
    serializer_class = serializers.DeploymentSerializer
    filterset_class = filtersets.DeploymentFilterSet


class HeartbeatViewSet(viewsets.ReadOnlyModelViewSet):
    # Of the device, its id only: a whole device row per heartbeat was half a page's time.
    queryset = Heartbeat.objects.select_related("device").only(
        *(f.name for f in Heartbeat._meta.concrete_fields), "device__device_id"
    )
    serializer_class = serializers.HeartbeatSerializer
    filterset_class = filtersets.HeartbeatFilterSet


class AuditEventViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = AuditEvent.objects.all()
    serializer_class = serializers.AuditEventSerializer
    filterset_class = filtersets.AuditEventFilterSet


class RolloutViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    queryset = Rollout.objects.select_related("version__model", "alias__model", "created_by").prefetch_related("stages")
    filterset_class = filtersets.RolloutFilterSet
    action_permissions = {
        action: ["fleet.release_rollout"] for action in ("start", "pause", "resume", "promote", "abort", "rollback")
    }

    def get_serializer_class(self):
        return serializers.RolloutCreateSerializer if self.action == "create" else serializers.RolloutSerializer

    def perform_create(self, serializer):
        serializer.instance = rollouts.create_rollout(actor=self.request.user, **serializer.service_arguments())

    def _act(self, request, service, body=serializers.RolloutActionSerializer):
        data = body(data=request.data)
        data.is_valid(raise_exception=True)
        rollout = service(self.get_object(), actor=request.user, **data.validated_data)
        return Response(serializers.RolloutSerializer(rollout, context=self.get_serializer_context()).data)

    @extend_schema(request=serializers.RolloutStartSerializer, responses=serializers.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request, pk=None):
        return self._act(request, rollouts.start_rollout, serializers.RolloutStartSerializer)

    @extend_schema(request=serializers.RolloutActionSerializer, responses=serializers.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request, pk=None):
        return self._act(request, rollouts.pause_rollout)

    @extend_schema(request=serializers.RolloutActionSerializer, responses=serializers.RolloutSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        return self._act(request, rollouts.resume_rollout)

    @extend_schema(
        request=serializers.RolloutActionSerializer,
        responses=serializers.RolloutSerializer,
        description="Skip the rest of the current stage's soak time; the stage's gates must still pass.",
    )
    @action(detail=True, methods=["post"])
    def promote(self, request, pk=None):
        return self._act(request, rollouts.promote_rollout)

    @extend_schema(
        request=serializers.RolloutActionSerializer,
        responses=serializers.RolloutSerializer,
        description="Stop for good: no more assignments; devices keep what they run. `rollback` undoes it.",
    )
    @action(detail=True, methods=["post"])
    def abort(self, request, pk=None):
        return self._act(request, rollouts.abort_rollout)

    @extend_schema(
        request=serializers.RolloutActionSerializer,
        responses=serializers.RolloutSerializer,
        description="Send every device the rollout reached back to the version it ran before.",
    )
    @action(detail=True, methods=["post"])
    def rollback(self, request, pk=None):
        return self._act(request, rollouts.rollback_rollout)

    @extend_schema(
        responses=serializers.RolloutProgressSerializer,
        description="Per stage: where its devices are, and each gate's value against its threshold. "
        "Poll it until `done`.",
    )
    @action(detail=True, methods=["get"], filter_backends=[], pagination_class=None)
    def progress(self, request, pk=None):
        progress = rollouts.rollout_progress(self.get_object())
        return Response(serializers.RolloutProgressSerializer(progress).data)


class PipelineViewSet(viewsets.ReadOnlyModelViewSet):
    queryset = Pipeline.objects.select_related("version__model", "created_by").prefetch_related("steps")
    serializer_class = serializers.PipelineSerializer
    filterset_fields = ["version", "state"]


class VariantPinViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet,
):
    queryset = VariantPin.objects.select_related("version", "device", "tag", "created_by")
    serializer_class = serializers.VariantPinSerializer
    filterset_fields = ["version", "device", "tag"]

    def perform_create(self, serializer):
        fields = dict(serializer.validated_data)
        fields.pop("version", None)
        serializer.instance = registry.pin_variant(fields.pop("artifact"), actor=self.request.user, **fields)

    def perform_destroy(self, instance):
        registry.unpin_variant(instance, actor=self.request.user)


@extend_schema(
    responses=serializers.SigningKeySerializer,
    description="The public half of the key that signs every published file's manifest: put it in each "
    "agent's `[security] plane_public_key`. Public, like any public key.",
)
@api_view(["GET"])
@permission_classes([AllowAny])
def signing_key(request):
    return Response({"algorithm": "ed25519", "public_key": signing.public_key()})


class TokenView(ObtainAuthToken):
    """A new API token for a username and password; 429 once sign-ins failed too often (fleet.auth).

    The plane keeps only a hash of each token, so it cannot hand out the one it gave before:
    each sign-in issues a new token and retires the user's last.
    """

    def post(self, request, *args, **kwargs):
        if auth.locked_out(request, str(request.data.get("username", ""))[:150] or None):
            raise Throttled(wait=settings.LOGIN_FAILURE_WINDOW, detail="Too many failed sign-ins; try again later.")
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        return Response({"token": auth.create_api_token(serializer.validated_data["user"], reason="API sign-in")})


class EnrollmentTokenViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    queryset = EnrollmentToken.objects.select_related("created_by").annotate(device_count=Count("devices"))
    filterset_fields = ["auto_approve"]
    action_permissions = {"revoke": ["fleet.change_enrollmenttoken"]}

    def get_serializer_class(self):
        if self.action == "create":
            return serializers.EnrollmentTokenCreateSerializer
        return serializers.EnrollmentTokenSerializer

    def perform_create(self, serializer):
        fields = dict(serializer.validated_data)
        hours = fields.pop("expires_in_hours")
        token, secret = enrollment.create_token(expires_in=timedelta(hours=hours), actor=self.request.user, **fields)
        token.device_count = 0
        token.token = secret
        serializer.instance = token

    @extend_schema(request=None, responses=serializers.EnrollmentTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request, pk=None):
        enrollment.revoke_token(self.get_object(), actor=request.user)
        return Response(self.get_serializer(self.get_queryset().get(pk=pk)).data)


class EnrollView(GenericAPIView):
    """An agent asks to join the fleet with an enrollment token and its public key (no user login)."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [ClientScopedRateThrottle]
    throttle_scope = "enroll"
    serializer_class = serializers.EnrollSerializer

    @extend_schema(request=serializers.EnrollSerializer, responses={202: serializers.EnrollmentStatusSerializer})
    def post(self, request):
        data = serializers.EnrollSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        fields = dict(data.validated_data)
        device = enrollment.enroll(fields.pop("token"), **fields)
        return Response({"device_id": device.device_id, "state": device.enrollment}, status=status.HTTP_202_ACCEPTED)


class CredentialsView(GenericAPIView):
    """An enrolled agent, signing a fresh timestamp with its key, gets its broker credentials once accepted."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    throttle_classes = [ClientScopedRateThrottle]
    throttle_scope = "enroll"
    serializer_class = serializers.CredentialsRequestSerializer

    @extend_schema(
        request=serializers.CredentialsRequestSerializer,
        responses={200: serializers.CredentialsSerializer, 202: serializers.EnrollmentStatusSerializer},
        description="Sign `edgefleet-credentials-v1\\n<device_id>\\n<timestamp_ms>` with the device's Ed25519 "
        "key. 202 while pending; 200 with a new broker password once accepted; 403 when rejected, "
        "decommissioned, or the signature does not verify.",
    )
    def post(self, request, device_id):
        data = serializers.CredentialsRequestSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        issued = enrollment.issue_credentials(device_id, **data.validated_data)
        if issued.state != EnrollmentState.ACCEPTED:
            return Response({"device_id": device_id, "state": issued.state}, status=status.HTTP_202_ACCEPTED)
        return Response(serializers.CredentialsSerializer(issued).data)
