"""Who may call the API: a token is required, and each method needs its model permission."""

import pytest
from django.contrib.auth.models import Permission

from fleet.models import AuditEvent, Model
from tests.fleet.helpers import make_device, make_published_version, make_version, token_client

pytestmark = pytest.mark.django_db


def test_it_hands_out_a_token_for_a_username_and_password(operator):
    response = token_client(None).post(
        "/api/v1/auth/token/", {"username": "olivia", "password": "correct horse battery staple"}
    )

    assert response.status_code == 200
    listing = token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {response.json()['token']}")
    assert listing.status_code == 200


def test_it_issues_a_new_token_at_each_sign_in_retires_the_last_and_audits_both(operator):
    credentials = {"username": "olivia", "password": "correct horse battery staple"}

    first = token_client(None).post("/api/v1/auth/token/", credentials).json()["token"]
    again = token_client(None).post("/api/v1/auth/token/", credentials).json()["token"]

    assert first != again
    assert token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {first}").status_code == 401
    assert token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION=f"Token {again}").status_code == 200
    events = AuditEvent.objects.filter(action="token.added")
    assert [(e.actor, e.object_repr, e.source_address) for e in events] == [(operator, "olivia", "127.0.0.1")] * 2
    assert {str(e.after) for e in events} == {"{'user': 'olivia'}"}


def test_it_refuses_a_wrong_password():
    response = token_client(None).post("/api/v1/auth/token/", {"username": "olivia", "password": "guess"})

    assert response.status_code == 400


@pytest.mark.parametrize("path", ["/api/v1/models/", "/api/v1/devices/", "/api/v1/audit/"])
def test_it_answers_401_without_credentials(path):
    response = token_client(None).get(path)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Token"


def test_it_answers_401_for_an_unknown_token():
    response = token_client(None).get("/api/v1/models/", HTTP_AUTHORIZATION="Token not-a-token")

    assert response.status_code == 401


@pytest.mark.parametrize(
    "path", ["/api/v1/models/", "/api/v1/versions/", "/api/v1/devices/", "/api/v1/heartbeats/", "/api/v1/audit/"]
)
def test_it_hides_everything_from_an_outsider(outsider, path):
    assert token_client(outsider).get(path).status_code == 403


def test_it_lets_a_viewer_read(viewer):
    make_device("dev-1")

    client = token_client(viewer)

    assert client.get("/api/v1/models/").status_code == 200
    assert client.get("/api/v1/devices/dev-1/").status_code == 200
    assert client.get("/api/v1/devices/dev-1/heartbeats/").status_code == 200


def test_it_refuses_every_write_to_a_viewer(viewer):
    draft = make_version()
    published = make_published_version("other")
    make_device("dev-1")
    client = token_client(viewer)

    attempts = [
        client.post("/api/v1/models/", {"name": "nope"}),
        client.post("/api/v1/versions/", {"model": "embedder"}),
        client.patch(f"/api/v1/versions/{draft.pk}/", {"notes": "x"}),
        client.post(f"/api/v1/versions/{draft.pk}/publish/"),
        client.post(f"/api/v1/versions/{draft.pk}/artifacts/", {}),
        client.post(f"/api/v1/versions/{published.pk}/assign/", {"devices": ["dev-1"]}, format="json"),
        client.put("/api/v1/devices/dev-1/tags/", {"tags": ["lab"]}, format="json"),
    ]

    assert [r.status_code for r in attempts] == [403] * len(attempts)
    assert not Model.objects.filter(name="nope").exists()


def test_it_asks_add_deployment_to_assign_not_change_version(viewer):
    published = make_published_version()
    make_device("dev-1")
    viewer.user_permissions.add(Permission.objects.get(codename="change_modelversion"))
    client = token_client(viewer)

    response = client.post(f"/api/v1/versions/{published.pk}/assign/", {"devices": ["dev-1"]}, format="json")

    assert response.status_code == 403


def test_it_lets_change_device_set_tags_without_other_write_permissions(viewer):
    make_device("dev-1")
    viewer.user_permissions.add(Permission.objects.get(codename="change_device"))

    response = token_client(viewer).put("/api/v1/devices/dev-1/tags/", {"tags": ["lab"]}, format="json")

    assert response.status_code == 200
    assert response.json()["tags"] == ["lab"]
