"""What the list endpoints do to stay fast keeps their answers as they were."""

from types import SimpleNamespace

import pytest
from rest_framework.request import Request
from rest_framework.serializers import HyperlinkedIdentityField
from rest_framework.test import APIRequestFactory

from fleet.api.fields import IdentityUrlField
from fleet.choices import DeploymentState
from fleet.models import Deployment
from fleet.services import assignments
from tests.fleet.helpers import make_device, make_published_version, token_client


@pytest.mark.parametrize("query", ["", "?format=json"])
def test_it_links_each_object_as_drf_would(db, query):
    request = Request(APIRequestFactory().get(f"/api/v1/devices/{query}", HTTP_HOST="127.0.0.1:8000"))
    fast = IdentityUrlField(view_name="api:device-detail", lookup_field="device_id")
    drf = HyperlinkedIdentityField(view_name="api:device-detail", lookup_field="device_id")
    # Plain ids take the template; the others (escaped, normalised) DRF's own path.
    for device_id in ["dev-1", "edge.box-1.lab", "a_b", "42", "x y", "ünï", "a:b", ".", "..", "..."]:
        device = SimpleNamespace(device_id=device_id)

        assert fast.get_url(device, "api:device-detail", request, None) == drf.get_url(
            device, "api:device-detail", request, None
        ), device_id


def test_it_links_by_primary_key_as_drf_would(db):
    request = Request(APIRequestFactory().get("/api/v1/deployments/"))
    fast = IdentityUrlField(view_name="api:deployment-detail")
    drf = HyperlinkedIdentityField(view_name="api:deployment-detail")

    for pk in [1, 7, 123456789]:
        deployment = SimpleNamespace(pk=pk)
        assert fast.get_url(deployment, "api:deployment-detail", request, None) == drf.get_url(
            deployment, "api:deployment-detail", request, None
        )


@pytest.mark.django_db
def test_it_lists_a_device_once_under_a_tag_it_carries_with_others(viewer):
    make_device("dev-1", tags=["lab", "rack-1", "floor-2"])
    make_device("dev-2", tags=["lab"])
    make_device("dev-3", tags=["field"])

    body = token_client(viewer).get("/api/v1/devices/?tag=lab").json()

    assert body["count"] == 2
    assert [(d["device_id"], d["tags"]) for d in body["results"]] == [
        ("dev-1", ["floor-2", "lab", "rack-1"]),
        ("dev-2", ["lab"]),
    ]


@pytest.mark.django_db
def test_it_shows_the_newest_deployment_not_superseded_on_each_device_of_a_page(viewer):
    first, second = make_published_version("embedder"), make_published_version("reranker")
    devices = [make_device(f"dev-{n}") for n in range(3)]
    assignments.assign_version(first, devices, actor="system")
    newest = {
        d.device.device_id: d for d in assignments.assign_version(second, devices[:2], actor="system").deployments
    }
    # A failed one stays current (not superseded) until something replaces it.
    Deployment.objects.filter(pk=newest["dev-1"].pk).update(state=DeploymentState.FAILED, error="disk full")

    page = token_client(viewer).get("/api/v1/devices/").json()["results"]

    current = {d["device_id"]: d["current_deployment"] for d in page}
    assert {k: (v["version"], v["state"]) for k, v in current.items()} == {
        "dev-0": ("reranker:1", "pending"),
        "dev-1": ("reranker:1", "failed"),
        "dev-2": ("embedder:1", "pending"),
    }
    assert current["dev-1"]["error"] == "disk full"
    assert current["dev-0"]["url"].endswith(f"/api/v1/deployments/{newest['dev-0'].pk}/")
