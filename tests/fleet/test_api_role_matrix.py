"""Every write of the API, tried by every persona (issue #6).

A persona a write is not for is refused, 401 without credentials and 403 with them, and
the database stays as it was. A role it is for gets through with a valid request, and the
write leaves one audit row: the user, the action, the object, what it was and became, when,
and from which address.

The writes come from the OpenAPI schema drf-spectacular generates: a new write endpoint
fails ``test_it_has_a_row_for_every_write_in_the_schema`` until it has a row in WRITES
(or, if nobody signs in to call it, in PUBLIC).

test_roles.py asks the same of the router's routes on a missing object (a refusal must
not tell whether the object exists); this file sends valid requests on real objects.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from django.apps import apps
from django.contrib.auth.models import User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import models
from drf_spectacular.generators import SchemaGenerator
from rest_framework.authtoken.models import Token

from fleet.choices import EnrollmentState, Role, RolloutState
from fleet.models import (
    Artifact,
    AuditEvent,
    Deployment,
    Device,
    EnrollmentToken,
    Model,
    ModelVersion,
    Pipeline,
    Rollout,
    VariantPin,
)
from fleet.services import aliases, enrollment, registry, rollouts
from tests.fleet.helpers import (
    add_ready_artifact,
    make_admin,
    make_device,
    make_member,
    make_model,
    make_outsider,
    make_published_version,
    make_release_manager,
    make_version,
    onnx_bytes,
    token_client,
)

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def quiet_broker(settings, fake_publisher):
    """Decommissioning and credentials talk to no broker admin; whatever is published is only recorded."""
    settings.MQTT_DYNSEC = False


# --- The table of writes -------------------------------------------------------------


@dataclass
class Call:
    """A valid request, its objects made: path parameters, body, and the object it changes (None: it creates one)."""

    params: dict[str, object] = field(default_factory=dict)
    body: dict | None = None
    subject: models.Model | None = None
    multipart: bool = False


@dataclass(frozen=True)
class Write:
    """One write operation of the schema, who besides an admin may call it, and what it leaves in the audit log."""

    method: str
    path: str
    roles: frozenset[Role]
    build: Callable[[], Call]
    # The audit action of a successful call; None for a route that always answers 405.
    action: str | None
    creates: type[models.Model] | None = None
    created_id: Callable[[dict], object] = lambda answer: answer["id"]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


OPERATOR = frozenset({Role.OPERATOR})
RELEASE = frozenset({Role.RELEASE_MANAGER})
ADMIN_ONLY: frozenset[Role] = frozenset()
# Stages as the service takes them (model fields) and as the API does.
STAGES = [{"device_count": 1, "min_soak_seconds": 3600}, {"percent": 100, "min_soak_seconds": 3600}]
API_STAGES = [{"device_count": 1, "min_soak_seconds": 3600}, {"percent": 100, "min_soak_seconds": 3600}]


def public_key_of(key: Ed25519PrivateKey) -> str:
    """An agent's public key as enrollment takes it: the raw 32 bytes in base64."""
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def make_enrolled_device(device_id: str = "dev-9", *, key: Ed25519PrivateKey | None = None) -> Device:
    """A device that asked to join with a token and waits for an operator's verdict."""
    _, secret = enrollment.create_token(name="lab", expires_in=timedelta(hours=1), actor="system")
    public_key = public_key_of(key or Ed25519PrivateKey.generate())
    return enrollment.enroll(secret, device_id=device_id, public_key=public_key)


def make_ready_draft() -> ModelVersion:
    version = make_version()
    add_ready_artifact(version)
    return version


def make_rollout(state: RolloutState) -> Rollout:
    """A rollout over two lab devices, in ``state``: draft, running (its canary assigned) or paused."""
    version = make_published_version()
    for i in range(2):
        make_device(f"dev-{i}", tags=["lab"])
    rollout = rollouts.create_rollout(version, stages=STAGES, tags=["lab"], actor="system")
    if state in (RolloutState.RUNNING, RolloutState.PAUSED):
        rollouts.start_rollout(rollout, actor="system")
    if state == RolloutState.PAUSED:
        rollouts.pause_rollout(rollout, actor="system")
    rollout.refresh_from_db()
    assert rollout.state == state
    return rollout


def new_model() -> Call:
    return Call(body={"name": "minilm", "description": "sentence embedder"})


def moved_alias() -> Call:
    one, two = make_published_version(), make_published_version()
    alias = aliases.move_alias(one.model, "stable", one, actor="system")
    return Call({"model_name": "embedder", "name": "stable"}, {"version": two.pk, "reason": "better recall"}, alias)


def new_version() -> Call:
    make_model()
    return Call(body={"model": "embedder", "notes": "first cut"})


def draft_notes() -> Call:
    draft = make_version()
    return Call({"id": draft.pk}, {"notes": "reviewed"}, draft)


def unused_draft() -> Call:
    draft = make_ready_draft()
    return Call({"id": draft.pk}, subject=draft)


def unused_published() -> Call:
    version = make_published_version()
    return Call({"id": version.pk}, {"reason": "superseded"}, version)


def upload() -> Call:
    draft = make_version()
    body = {"file": SimpleUploadedFile("model.onnx", onnx_bytes("upload")), "precision": "fp32"}
    return Call({"id": draft.pk}, body, multipart=True)


def assignment() -> Call:
    version = make_published_version()
    make_device("dev-1")
    return Call({"id": version.pk}, {"devices": ["dev-1"], "reason": "canary"})


def optimization() -> Call:
    draft = make_ready_draft()
    return Call({"id": draft.pk}, {"variants": ["int8"]})


def ready_draft() -> Call:
    draft = make_ready_draft()
    return Call({"id": draft.pk}, subject=draft)


def version_tags() -> Call:
    draft = make_version()
    return Call({"id": draft.pk}, {"tags": {"dataset": "v2", "reviewed": ""}}, draft)


def device_tags() -> Call:
    device = make_device("dev-1", tags=["shelf"])
    return Call({"device_id": device.device_id}, {"tags": ["lab"]}, device)


def pending_device() -> Call:
    device = make_enrolled_device()
    return Call({"device_id": device.device_id}, subject=device)


def accepted_device() -> Call:
    device = make_device("dev-1")
    return Call({"device_id": device.device_id}, subject=device)


def new_rollout() -> Call:
    version = make_published_version()
    make_device("dev-1", tags=["lab"])
    return Call(body={"version": version.pk, "selector": {"tags": ["lab"]}, "stages": API_STAGES})


def rollout_in(state: RolloutState) -> Callable[[], Call]:
    def build() -> Call:
        rollout = make_rollout(state)
        return Call({"id": rollout.pk}, {"reason": "checked by hand"}, rollout)

    return build


def new_pin() -> Call:
    version = make_published_version()
    make_device("dev-1")
    return Call(body={"artifact": version.artifacts.get().pk, "device": "dev-1", "reason": "fp32 on the lab box"})


def existing_pin() -> Call:
    version = make_published_version()
    pin = registry.pin_variant(version.artifacts.get(), device=make_device("dev-1"), actor="system")
    return Call({"id": pin.pk}, subject=pin)


def new_token() -> Call:
    return Call(body={"name": "line-3", "expires_in_hours": 2, "max_devices": 10})


def live_token() -> Call:
    token, _ = enrollment.create_token(name="line-3", expires_in=timedelta(hours=1), actor="system")
    return Call({"id": token.pk}, subject=token)


WRITES = [
    Write("POST", "/api/v1/models/", RELEASE, new_model, "model.created", Model),
    Write("PUT", "/api/v1/models/{model_name}/aliases/{name}/", RELEASE, moved_alias, "alias.moved"),
    Write("POST", "/api/v1/versions/", RELEASE, new_version, "version.created", ModelVersion),
    # Routed by UpdateModelMixin, but only PATCH changes a version (its notes): PUT answers 405.
    Write("PUT", "/api/v1/versions/{id}/", RELEASE, draft_notes, None),
    Write("PATCH", "/api/v1/versions/{id}/", RELEASE, draft_notes, "version.notes_changed"),
    Write("DELETE", "/api/v1/versions/{id}/", RELEASE, unused_draft, "version.deleted"),
    Write("POST", "/api/v1/versions/{id}/archive/", RELEASE, unused_published, "version.archived"),
    Write("POST", "/api/v1/versions/{id}/artifacts/", RELEASE, upload, "artifact.uploaded", Artifact),
    Write(
        "POST",
        "/api/v1/versions/{id}/assign/",
        RELEASE,
        assignment,
        "deployment.assigned",
        Deployment,
        lambda answer: answer["deployments"][0]["id"],
    ),
    Write("POST", "/api/v1/versions/{id}/optimize/", RELEASE, optimization, "pipeline.started", Pipeline),
    Write("POST", "/api/v1/versions/{id}/publish/", RELEASE, ready_draft, "version.published"),
    Write("PUT", "/api/v1/versions/{id}/tags/", RELEASE, version_tags, "version.tags_changed"),
    Write("PUT", "/api/v1/devices/{device_id}/tags/", OPERATOR, device_tags, "device.tags_set"),
    Write("POST", "/api/v1/devices/{device_id}/accept/", OPERATOR, pending_device, "device.accepted"),
    Write("POST", "/api/v1/devices/{device_id}/reject/", OPERATOR, pending_device, "device.rejected"),
    Write("POST", "/api/v1/devices/{device_id}/decommission/", OPERATOR, accepted_device, "device.decommissioned"),
    Write("POST", "/api/v1/rollouts/", RELEASE, new_rollout, "rollout.created", Rollout),
    Write("POST", "/api/v1/rollouts/{id}/start/", RELEASE, rollout_in(RolloutState.DRAFT), "rollout.start"),
    Write("POST", "/api/v1/rollouts/{id}/pause/", RELEASE, rollout_in(RolloutState.RUNNING), "rollout.pause"),
    Write("POST", "/api/v1/rollouts/{id}/resume/", RELEASE, rollout_in(RolloutState.PAUSED), "rollout.resume"),
    Write("POST", "/api/v1/rollouts/{id}/promote/", RELEASE, rollout_in(RolloutState.RUNNING), "rollout.promote"),
    Write("POST", "/api/v1/rollouts/{id}/abort/", RELEASE, rollout_in(RolloutState.RUNNING), "rollout.abort"),
    Write("POST", "/api/v1/rollouts/{id}/rollback/", RELEASE, rollout_in(RolloutState.RUNNING), "rollout.rollback"),
    Write("POST", "/api/v1/pins/", RELEASE, new_pin, "variant.pinned", VariantPin),
    Write("DELETE", "/api/v1/pins/{id}/", RELEASE, existing_pin, "variant.unpinned"),
    # Who may let devices join is an admin's decision: fleet.roles gives enrollment tokens to no other role.
    Write("POST", "/api/v1/enrollment-tokens/", ADMIN_ONLY, new_token, "enrollment_token.created", EnrollmentToken),
    Write("POST", "/api/v1/enrollment-tokens/{id}/revoke/", ADMIN_ONLY, live_token, "enrollment_token.revoked"),
]

# Writes nobody signs in for, on purpose; each is tested below for what it must refuse.
PUBLIC = {
    # Signing in: the caller has no token yet; it must get one only for the right password.
    ("POST", "/api/v1/auth/token/"),
    # An agent joining the fleet holds an enrollment token, not a user login.
    ("POST", "/api/v1/enroll/"),
    # An enrolled agent fetching its broker login proves itself by signing with its own key.
    ("POST", "/api/v1/enroll/{device_id}/credentials/"),
}


def schema_writes() -> set[tuple[str, str]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    return {
        (method.upper(), path)
        for path, operations in schema["paths"].items()
        for method in operations
        if method in ("post", "put", "patch", "delete")
    }


def test_it_has_a_row_for_every_write_in_the_schema():
    tabled = {(write.method, write.path) for write in WRITES} | PUBLIC
    found = schema_writes()

    assert sorted(found - tabled) == [], "write operations with no row in WRITES or PUBLIC"
    assert sorted(tabled - found) == [], "rows for operations the schema does not have"
    assert len(WRITES) == len({(write.method, write.path) for write in WRITES})


# --- Personas ------------------------------------------------------------------------

ANONYMOUS, OUTSIDER = "anonymous", "outsider"
PERSONAS = [ANONYMOUS, OUTSIDER, *Role]
MEMBERS: dict[str, Callable[[], User]] = {
    Role.VIEWER: lambda: make_member("victor", Role.VIEWER),
    Role.OPERATOR: lambda: make_member("olivia", Role.OPERATOR),
    Role.RELEASE_MANAGER: make_release_manager,
    Role.ADMIN: make_admin,
}


def make_persona(who: str) -> User | None:
    if who == ANONYMOUS:
        return None
    if who == OUTSIDER:
        return make_outsider()
    return MEMBERS[who]()


def may(who: str, write: Write) -> bool:
    return who == Role.ADMIN or who in write.roles


def cases(allowed: bool) -> list:
    return [
        pytest.param(write, who, id=f"{write} as {who}")
        for write in WRITES
        for who in PERSONAS
        if may(who, write) == allowed
    ]


def send(user: User | None, write: Write, call: Call):
    url = write.path.format(**call.params)
    request = getattr(token_client(user), write.method.lower())
    return request(url, call.body, format="multipart" if call.multipart else "json")


def fleet_rows() -> dict[str, list[dict]]:
    """Every row of every fleet table, the audit log and many-to-many links included."""
    tables = apps.get_app_config("fleet").get_models(include_auto_created=True)
    return {model._meta.db_table: list(model._default_manager.order_by("pk").values()) for model in tables}


# --- The matrix ------------------------------------------------------------------------


@pytest.mark.parametrize(("write", "who"), cases(allowed=False))
def test_it_refuses_a_write_to_whoever_it_is_not_for(write, who):
    call = write.build()
    user = make_persona(who)
    before = fleet_rows()

    response = send(user, write, call)

    assert response.status_code == (401 if who == ANONYMOUS else 403), response.content
    assert fleet_rows() == before


@pytest.mark.parametrize(("write", "who"), cases(allowed=True))
def test_it_lets_the_roles_a_write_is_for_make_it_and_audits_it(write, who):
    call = write.build()
    user = make_persona(who)

    response = send(user, write, call)

    if write.action is None:
        assert response.status_code == 405, response.content
        assert not AuditEvent.objects.filter(actor=user).exists()
        return
    assert 200 <= response.status_code < 300, response.content
    event = AuditEvent.objects.get(actor=user, action=write.action)
    assert (event.actor_label, event.source_address) == (f"user:{user.username}", "127.0.0.1")
    assert event.created_at is not None
    if call.subject is None:
        created = (write.creates._meta.model_name, str(write.created_id(response.json())))
        assert (event.object_type, event.object_id) == created
        assert (event.before, bool(event.after)) == (None, True), "a creation records what it made"
    else:
        assert (event.object_type, event.object_id) == (call.subject._meta.model_name, str(call.subject.pk))
        assert event.before, "a change records what the object was"
        if write.method != "DELETE":
            assert event.after is not None and event.after != event.before, "a change records what it became"


# --- Writes nobody signs in for ----------------------------------------------------------


def test_it_gives_a_token_only_for_the_right_password():
    make_member("olivia", Role.OPERATOR)
    client = token_client(None)

    wrong = client.post("/api/v1/auth/token/", {"username": "olivia", "password": "guess"}, format="json")
    unknown = client.post("/api/v1/auth/token/", {"username": "nobody", "password": "guess"}, format="json")

    assert (wrong.status_code, unknown.status_code) == (400, 400)
    assert not Token.objects.exists()


@pytest.mark.parametrize("token", ["unknown", "expired", "revoked"])
def test_it_enrolls_no_device_without_a_live_token(token):
    made, secret = enrollment.create_token(
        name="lab", expires_in=timedelta(hours=-1 if token == "expired" else 1), actor="system"
    )
    if token == "revoked":
        enrollment.revoke_token(made, actor="system")
    public_key = public_key_of(Ed25519PrivateKey.generate())
    body = {"token": "eft_guess" if token == "unknown" else secret, "device_id": "dev-9", "public_key": public_key}
    before = fleet_rows()

    response = token_client(None).post("/api/v1/enroll/", body, format="json")

    assert response.status_code == 400, response.content
    assert fleet_rows() == before


def test_it_enrolls_a_device_as_pending_and_audits_it_with_its_address():
    _, secret = enrollment.create_token(name="lab", expires_in=timedelta(hours=1), actor="system")
    body = {"token": secret, "device_id": "dev-9", "public_key": public_key_of(Ed25519PrivateKey.generate())}

    response = token_client(None).post("/api/v1/enroll/", body, format="json")

    assert response.status_code == 202, response.content
    event = AuditEvent.objects.get(action="device.enrolled")
    assert (event.actor_label, event.object_id, event.source_address) == (
        "device:dev-9",
        str(Device.objects.get(device_id="dev-9").pk),
        "127.0.0.1",
    )


def ask_credentials(device_id: str, key: Ed25519PrivateKey):
    timestamp_ms = int(time.time() * 1000)
    signature = key.sign(enrollment.signed_message(device_id, timestamp_ms))
    body = {"timestamp_ms": timestamp_ms, "signature": base64.b64encode(signature).decode()}
    return token_client(None).post(f"/api/v1/enroll/{device_id}/credentials/", body, format="json")


@pytest.mark.parametrize("case", ["forged signature", "unknown device", "rejected", "decommissioned"])
def test_it_gives_no_credentials_to_a_device_it_cannot_trust(case):
    key = Ed25519PrivateKey.generate()
    device = make_enrolled_device("dev-9", key=key)
    if case in ("rejected", "decommissioned"):
        verdict = enrollment.reject_device if case == "rejected" else enrollment.decommission_device
        verdict(device, actor="system")
    signer = Ed25519PrivateKey.generate() if case == "forged signature" else key
    before = fleet_rows()

    response = ask_credentials("dev-8" if case == "unknown device" else "dev-9", signer)

    assert response.status_code == 403, response.content
    assert fleet_rows() == before


def test_it_tells_a_pending_device_to_wait_and_gives_it_nothing():
    key = Ed25519PrivateKey.generate()
    make_enrolled_device("dev-9", key=key)
    before = fleet_rows()

    response = ask_credentials("dev-9", key)

    assert (response.status_code, response.json()) == (202, {"device_id": "dev-9", "state": "pending"})
    assert fleet_rows() == before


def test_it_gives_an_accepted_device_its_credentials_and_audits_it_with_its_address():
    key = Ed25519PrivateKey.generate()
    enrollment.accept_device(make_enrolled_device("dev-9", key=key), actor="system")

    response = ask_credentials("dev-9", key)

    assert response.status_code == 200, response.content
    assert response.json()["state"] == EnrollmentState.ACCEPTED
    event = AuditEvent.objects.get(action="device.credentials_issued")
    assert (event.actor_label, event.source_address) == ("device:dev-9", "127.0.0.1")
