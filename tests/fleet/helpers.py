"""Explicit builders for fleet tests, and the one persona set: operator, viewer, outsider."""

from __future__ import annotations

import io
import secrets
import time

import numpy as np
from django.contrib.auth.models import Group, Permission, User
from onnx import TensorProto, helper, numpy_helper
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from agent.contract import signing, wire
from fleet import auth
from fleet.choices import Role
from fleet.models import Artifact, Device, Model, ModelVersion
from fleet.services import devices, registry

# The plane signs manifests with this in every fleet test (conftest.signing_key).
SIGNING_KEY = signing.generate_private_key()

# --- Personas ----------------------------------------------------------------------


def make_user(username: str, codenames: list[str] | None = None) -> User:
    user = User.objects.create_user(username=username, password="correct horse battery staple")
    if codenames:
        user.user_permissions.set(Permission.objects.filter(content_type__app_label="fleet", codename__in=codenames))
    return user


def make_operator(username: str = "olivia") -> User:
    """Every fleet permission."""
    codenames = list(Permission.objects.filter(content_type__app_label="fleet").values_list("codename", flat=True))
    return make_user(username, codenames)


def make_viewer(username: str = "victor") -> User:
    """Every fleet view permission, nothing else."""
    codenames = Permission.objects.filter(content_type__app_label="fleet", codename__startswith="view_")
    return make_user(username, list(codenames.values_list("codename", flat=True)))


def make_outsider(username: str = "oscar") -> User:
    """Signed in, no fleet permission."""
    return make_user(username)


def make_member(username: str, role: str) -> User:
    """A user whose only permissions come from one role's group (fleet.roles)."""
    user = make_user(username)
    user.groups.add(Group.objects.get(name=role))
    return user


def make_release_manager(username: str = "rita") -> User:
    """The release-manager role: versions, aliases, rollouts, deployments, pipelines and pins."""
    return make_member(username, Role.RELEASE_MANAGER)


def make_admin(username: str = "ada") -> User:
    """The admin role: every fleet permission but rewriting the audit log, and users and tokens."""
    return make_member(username, Role.ADMIN)


def token_client(user: User | None) -> APIClient:
    """An API client that sends the user's token, or nothing at all for None."""
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {api_token(user)}")
    return client


# The plane keeps only a hash of each token: the secrets the tests were given, by what is stored.
_SECRETS: dict[str, str] = {}


def api_token(user: User) -> str:
    """The user's API token: the one a test made already, while it is still the stored one."""
    stored = Token.objects.filter(user=user).values_list("key", flat=True).first()
    if stored in _SECRETS:
        return _SECRETS[stored]
    # Stored as fleet.auth.create_api_token stores it, without its audit row: a test's setup, not a write.
    secret = secrets.token_hex(20)
    Token.objects.filter(user=user).delete()
    Token.objects.create(user=user, key=auth.stored_token_key(secret))
    _SECRETS[auth.stored_token_key(secret)] = secret
    return secret


# --- Files -------------------------------------------------------------------------


def onnx_bytes(name: str = "tiny", weights: int = 16) -> bytes:
    """A valid ONNX graph y = x + w; ``name`` varies the bytes, ``weights`` the size (4 bytes each)."""
    w = numpy_helper.from_array(np.arange(weights, dtype=np.float32).reshape(1, weights), name="w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"], name=name)],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weights])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weights])],
        initializer=[w],
    )
    model = helper.make_model(graph, producer_name="edgefleet-tests", opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


# --- Registry ----------------------------------------------------------------------


def make_model(name: str = "embedder") -> Model:
    return registry.create_model(name=name, actor="system")


def make_version(model: Model | None = None, **fields) -> ModelVersion:
    return registry.create_version(model or make_model(), actor="system", **fields)


def add_ready_artifact(
    version: ModelVersion, data: bytes | None = None, *, precision: str = "fp32", hardware_class: str = "any"
) -> Artifact:
    """Upload and process at once, whether or not on-commit callbacks run in this test."""
    data = data if data is not None else onnx_bytes(f"{version.label}-{precision}-{hardware_class}")
    artifact = registry.add_artifact(
        version,
        io.BytesIO(data),
        filename="model.onnx",
        precision=precision,
        hardware_class=hardware_class,
        actor="system",
    )
    return registry.process_artifact(artifact.pk)


def make_published_version(model_name: str = "embedder", **fields) -> ModelVersion:
    version = make_version(Model.objects.filter(name=model_name).first() or make_model(model_name), **fields)
    add_ready_artifact(version)
    return registry.publish_version(version, actor="system")


# --- Devices -----------------------------------------------------------------------


def make_device(device_id: str = "dev-1", *, arch: str = "x86_64", os: str = "linux", tags=()) -> Device:
    """A device as it appears in the fleet: from its hello."""
    hello = wire.Hello(
        device_id=device_id,
        name=f"{device_id} in the lab",
        hardware=wire.HardwareProfile(
            arch=arch, os=os, cpu_count=4, ram_bytes=8 << 30, providers=["CPUExecutionProvider"], agent_version="0.1.0"
        ),
        sent_at=time.time(),
    )
    device, _ = devices.record_hello(hello)
    if tags:
        devices.set_tags(device, list(tags), actor="system")
    return device


def heartbeat(device_id: str = "dev-1", seq: int = 1, p95_ms: float = 12.0) -> wire.Heartbeat:
    return wire.Heartbeat(
        device_id=device_id,
        seq=seq,
        sent_at=time.time(),
        interval_s=30,
        uptime_s=60 + seq,
        cpu_percent=3.5,
        mem_rss_bytes=50 << 20,
        mem_available_bytes=4 << 30,
        requests=10,
        latency=wire.LatencyStats(count=10, p50_ms=8.0, p95_ms=p95_ms, p99_ms=p95_ms + 1, max_ms=p95_ms + 2),
    )
