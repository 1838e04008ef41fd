from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from fleet.metrics import metrics_view

admin.site.site_header = "Edgefleet control plane"
admin.site.site_title = "Edgefleet"
admin.site.index_title = "Models, devices and deployments"

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("fleet.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("metrics", metrics_view, name="metrics"),
    path("", include("fleet.console.urls")),
]
