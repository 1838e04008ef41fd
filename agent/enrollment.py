"""Joining a fleet: an enrollment token, a key pair of the device's own, and broker credentials.

The agent generates an Ed25519 key pair once (``device.key`` in its data directory, mode
0600), presents the token and its public key to the plane, and then asks for its broker
credentials, signing a fresh timestamp each time, until an operator has accepted it.
The credentials are kept in ``broker.json`` (mode 0600) and reused on the next start.
docs/protocol.md describes the exchange.

Whom it trusts: the plane only over ``https://`` (plain ``http://`` only to a loopback
address, or with ``enrollment.allow_insecure``), and the broker the plane names only on
a host the config names too (the plane's host, ``broker_url``'s, or
``enrollment.broker_hosts``), over ``mqtts://`` unless it is loopback or insecure is
allowed. A plane, or someone in its path, cannot send the device to a broker of theirs.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from agent.contract import wire
from agent.contract.signing import signed_message

log = logging.getLogger("agent.enrollment")

KEY_FILE = "device.key"
CREDENTIALS_FILE = "broker.json"


class EnrollmentError(Exception):
    """The plane refused the device, or could not be reached; the text says which."""


class Credentials(msgspec.Struct, kw_only=True):
    username: str | None
    password: str | None
    broker_url: str | None


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_plane_url(url: str, *, allow_insecure: bool = False) -> str:
    """The plane's host; raise EnrollmentError unless ``url`` is https, or http where that is allowed."""
    parts = urlsplit(url)
    host = parts.hostname
    if not host or parts.scheme not in ("https", "http"):
        raise EnrollmentError(f"plane URL {url!r} must be https://host[:port]")
    if parts.scheme == "http" and not (allow_insecure or is_loopback(host)):
        raise EnrollmentError(
            f"plane URL {url!r} is plain http: the enrollment token and the broker password would cross "
            "the network in clear. Use https://, or set enrollment.allow_insecure = true (a lab network only)"
        )
    return host


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` readable by this user only (the device key, its broker password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_or_create_key(data_path: Path) -> Ed25519PrivateKey:
    """The device's key pair: made on first use, never leaves the device."""
    path = data_path / KEY_FILE
    if path.exists():
        key = load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise EnrollmentError(f"{path} is not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    write_private(path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    return key


def public_key_text(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


Post = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any]]]


def http_post(url: str, body: dict[str, Any], timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    """POST JSON, answer (status, JSON body); refusals are answers, not exceptions."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - the configured plane URL
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise EnrollmentError(f"cannot reach the plane at {url}: {exc}") from None


def enroll(
    *,
    plane_url: str,
    token: str,
    device_id: str,
    name: str,
    data_path: Path,
    stop: threading.Event,
    poll_interval: float = 10.0,
    post: Post = http_post,
    clock: Callable[[], float] = time.time,
    allow_insecure: bool = False,
) -> Credentials | None:
    """Credentials from ``broker.json``, or enroll and wait for them; None if stopped first."""
    check_plane_url(plane_url, allow_insecure=allow_insecure)
    saved = data_path / CREDENTIALS_FILE
    if saved.exists():
        return msgspec.json.decode(saved.read_bytes(), type=Credentials)
    key = load_or_create_key(data_path)
    base = plane_url.rstrip("/")
    body = {"token": token, "device_id": device_id, "public_key": public_key_text(key), "name": name}
    status, answer = post(f"{base}/api/v1/enroll/", body)
    if status != 202:
        raise EnrollmentError(f"the plane refused the enrollment ({status}): {answer.get('detail', answer)}")
    log.info("enrollment.requested device_id=%s state=%s", device_id, answer.get("state"))
    while not stop.is_set():
        timestamp_ms = int(clock() * 1000)
        signature = base64.b64encode(key.sign(signed_message(device_id, timestamp_ms))).decode()
        url = f"{base}/api/v1/enroll/{device_id}/credentials/"
        status, answer = post(url, {"timestamp_ms": timestamp_ms, "signature": signature})
        if status == 200:
            credentials = msgspec.convert(answer, Credentials, strict=False)
            write_private(saved, msgspec.json.encode(credentials))
            log.info("enrollment.accepted device_id=%s", device_id)
            return credentials
        if status != 202:
            raise EnrollmentError(f"the plane refused the device ({status}): {answer.get('detail', answer)}")
        log.info("enrollment.pending device_id=%s", device_id)
        stop.wait(poll_interval)
    return None


def broker_with(
    broker: wire.BrokerUrl,
    credentials: Credentials,
    *,
    allowed_hosts: Collection[str],
    allow_insecure: bool = False,
) -> wire.BrokerUrl:
    """The configured broker, or the one the plane named, logged in as the device.

    A broker the plane names must be on one of ``allowed_hosts`` and, unless it is on
    loopback or ``allow_insecure``, reached over TLS; raise EnrollmentError otherwise.
    """
    if credentials.broker_url:
        broker = _named_broker(credentials.broker_url, allowed_hosts, allow_insecure=allow_insecure)
    if credentials.username:
        broker = msgspec.structs.replace(broker, username=credentials.username, password=credentials.password)
    return broker


def _named_broker(url: str, allowed_hosts: Collection[str], *, allow_insecure: bool) -> wire.BrokerUrl:
    try:
        named = wire.parse_broker_url(url)
    except wire.WireError as exc:
        raise EnrollmentError(f"the plane named a broker the agent cannot use: {exc}") from None
    if named.host.lower() not in {host.lower() for host in allowed_hosts}:
        raise EnrollmentError(
            f"the plane named broker host {named.host!r}, which is not the plane's host, broker_url's, "
            f"or in enrollment.broker_hosts ({', '.join(sorted(allowed_hosts))}): refused"
        )
    if not named.tls and not (allow_insecure or is_loopback(named.host)):
        raise EnrollmentError(
            f"the plane named a broker without TLS ({named.host}:{named.port}, mqtt://): refused. The broker "
            "needs mqtts://, or set enrollment.allow_insecure = true (a lab network only)"
        )
    return named
