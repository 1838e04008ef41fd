from django.urls import path
from rest_framework.authtoken.views import obtain_auth_token
from rest_framework.routers import DefaultRouter

from fleet.api import views

app_name = "api"

router = DefaultRouter()
# Model names and device ids may contain dots: no ".json" suffix routes to confuse them with.
router.include_format_suffixes = False
router.register("models", views.RegistryModelViewSet, basename="model")
router.register("versions", views.VersionViewSet, basename="version")
router.register("artifacts", views.ArtifactViewSet, basename="artifact")
router.register("devices", views.DeviceViewSet, basename="device")
router.register("deployments", views.DeploymentViewSet, basename="deployment")
router.register("heartbeats", views.HeartbeatViewSet, basename="heartbeat")
router.register("audit", views.AuditEventViewSet, basename="auditevent")
router.register("pipelines", views.PipelineViewSet, basename="pipeline")
router.register("pins", views.VariantPinViewSet, basename="variantpin")
router.register("rollouts", views.RolloutViewSet, basename="rollout")

urlpatterns = [
    path("auth/token/", obtain_auth_token, name="token"),
    *router.urls,
]
