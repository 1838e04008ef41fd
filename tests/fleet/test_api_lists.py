"""List endpoints cost a fixed number of queries however long the page, and the schema builds."""

import pytest

from fleet.api.pagination import Pages
from fleet.models import AuditEvent
from fleet.services import assignments
from tests.fleet.helpers import add_ready_artifact, make_device, make_published_version, make_version, token_client
from tests.fleet.test_api_devices import store_heartbeats

# Token lookup, the user's permissions and group permissions: three queries before any work.
AUTH_QUERIES = 3
# Per endpoint: count, page, and one per prefetched relation.
LIST_QUERIES = {
    "models": 2,
    "versions": 5,  # + artifacts, tags, aliases
    "artifacts": 2,
    "devices": 4,  # + tags, + current deployment
    "deployments": 2,
    "heartbeats": 2,
    "audit": 2,
}


def populate(n: int) -> None:
    for i in range(n):
        device = make_device(f"dev-{i}", tags=["lab", f"rack-{i}"])
        version = make_published_version(f"model-{i}")
        add_ready_artifact(make_version(version.model))
        assignments.assign_version(version, [device], actor="system")
        store_heartbeats(device, 2)


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", LIST_QUERIES)
@pytest.mark.parametrize("rows", [1, 5])
def test_it_lists_in_a_fixed_number_of_queries(operator, django_assert_num_queries, endpoint, rows):
    populate(rows)
    client = token_client(operator)

    with django_assert_num_queries(AUTH_QUERIES + LIST_QUERIES[endpoint]):
        response = client.get(f"/api/v1/{endpoint}/")

    assert response.status_code == 200
    assert response.json()["count"] >= rows


@pytest.mark.django_db
def test_it_pages_with_limit_and_offset(viewer):
    for i in range(3):
        make_device(f"dev-{i}")

    body = token_client(viewer).get("/api/v1/devices/?limit=2&offset=1").json()

    assert body["count"] == 3
    assert [d["device_id"] for d in body["results"]] == ["dev-1", "dev-2"]


@pytest.mark.django_db
def test_it_lists_the_audit_log_with_filters(operator, viewer):
    client = token_client(operator)
    client.post("/api/v1/models/", {"name": "minilm"})
    client.post("/api/v1/versions/", {"model": "minilm"}, format="json")
    make_device("dev-1")
    reader = token_client(viewer)

    by_user = reader.get("/api/v1/audit/", {"actor_label": "user:olivia"}).json()["results"]
    by_action = reader.get("/api/v1/audit/", {"action": "device.registered"}).json()["results"]
    by_type = reader.get("/api/v1/audit/", {"object_type": "modelversion"}).json()["results"]

    assert [e["action"] for e in by_user] == ["version.created", "model.created"]
    assert [e["actor_label"] for e in by_action] == ["device:dev-1"]
    assert [e["object_repr"] for e in by_type] == ["minilm:1"]


@pytest.mark.django_db
def test_it_has_no_writes_on_the_audit_log(operator):
    make_device("dev-1")
    event = AuditEvent.objects.get()
    client = token_client(operator)

    assert client.delete(f"/api/v1/audit/{event.pk}/").status_code == 405
    assert client.post("/api/v1/audit/", {"action": "forged"}).status_code == 405


@pytest.mark.django_db
def test_it_serves_the_openapi_schema(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")

    assert response.status_code == 200
    schema = response.json()
    assert "/api/v1/versions/{id}/assign/" in schema["paths"]
    assert (
        "multipart/form-data" in schema["paths"]["/api/v1/versions/{id}/artifacts/"]["post"]["requestBody"]["content"]
    )
    assert client.get("/api/docs/").status_code == 200


@pytest.mark.django_db
def test_a_page_is_capped_whatever_limit_is_asked(operator, monkeypatch):
    assert Pages.max_limit == 1000
    monkeypatch.setattr(Pages, "max_limit", 2)
    for n in range(3):
        make_device(f"paged-{n}")

    body = token_client(operator).get("/api/v1/devices/?limit=100000").json()

    assert body["count"] == 3 and len(body["results"]) == 2
