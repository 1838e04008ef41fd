from django.urls import path

from fleet.console import views

app_name = "console"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("rollouts/<int:pk>/", views.rollout, name="rollout"),
    path("rollouts/<int:pk>/<str:action>/", views.act, name="act"),
    path("devices/<str:device_id>/", views.device, name="device"),
]
