from django.urls import path
from rest_framework.routers import DefaultRouter

from fleet.api import views

app_name = "api"

router = DefaultRouter()
# Model names and device ids may contain dots: no ".json" suffix routes to confuse them with.
router.include_format_suffixes = False
router.register("models", views.RegistryModelViewSet, basename="model")
router.register(r"models/(?P<model_name>[^/]+)/aliases", views.AliasViewSet, basename="alias")
router.register("versions", views.VersionViewSet, basename="version")
router.register("artifacts", views.ArtifactViewSet, basename="artifact")
router.register("devices", views.DeviceViewSet, basename="device")
router.register("deployments", views.DeploymentViewSet, basename="deployment")
router.register("heartbeats", views.HeartbeatViewSet, basename="heartbeat")
router.register("audit", views.AuditEventViewSet, basename="auditevent")
router.register("pipelines", views.PipelineViewSet, basename="pipeline")
router.register("pins", views.VariantPinViewSet, basename="variantpin")
router.register("rollouts", views.RolloutViewSet, basename="rollout")
router.register("enrollment-tokens", views.EnrollmentTokenViewSet, basename="enrollmenttoken")

urlpatterns = [
    path("auth/token/", views.TokenView.as_view(), name="token"),
    path("enroll/", views.EnrollView.as_view(), name="enroll"),
    path("enroll/<str:device_id>/credentials/", views.CredentialsView.as_view(), name="enroll-credentials"),
    path("signing-key/", views.signing_key, name="signing-key"),
    *router.urls,
]
