"""Enrollment: tokens that let agents ask to join, the operator's verdict, and broker credentials.

The flow and its threats are in docs/protocol.md and docs/security.md. In short: an agent
presents a token and its Ed25519 public key and is pending; once accepted (by an operator,
or by the token's auto-approve rule) it proves it holds the private key by signing a fresh
timestamp, and gets a broker password generated for that request. The plane never keeps
the password, only the broker does (hashed).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agent.contract.signing import signed_message
from agent.contract.wire import parse_broker_url
from fleet.choices import EnrollmentState
from fleet.errors import Forbidden, Invalid
from fleet.models import Device, EnrollmentToken
from fleet.services.audit import Actor, acting_user, record

TOKEN_PREFIX = "eft_"
# Device ids no device may take: they name, or look like, the broker logins of the plane itself.
# Device logins have a namespace of their own (fleet.mqtt.dynsec.device_username); this is the
# second wall, and it keeps audit rows and logs unambiguous.
RESERVED_DEVICE_IDS = frozenset({"admin", "administrator", "root", "bridge", "plane", "broker", "mosquitto"})
RESERVED_DEVICE_PREFIXES = ("edgefleet", "$", "sys")


class EnrollmentError(Invalid):
    """The request cannot be granted; the text says why, and is safe to show the caller."""


class NotAccepted(EnrollmentError):
    """The device is not (or not yet, or no longer) accepted."""

    status = Forbidden.status


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# --- Tokens ----------------------------------------------------------------------------


def create_token(
    *, name: str, expires_in: timedelta, actor: Actor, auto_approve: bool = False, max_devices: int | None = None
) -> tuple[EnrollmentToken, str]:
    """A new token and its secret, which is shown this once: only its hash is stored."""
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        token = EnrollmentToken.objects.create(
            name=name,
            prefix=secret[:8],
            token_hash=hash_token(secret),
            expires_at=timezone.now() + expires_in,
            auto_approve=auto_approve,
            max_devices=max_devices,
            created_by=acting_user(actor),
        )
        record(actor, "enrollment_token.created", token, after=_token_fields(token))
    return token, secret


def _token_fields(token: EnrollmentToken) -> dict:
    return {
        "name": token.name,
        "prefix": token.prefix,
        "expires_at": token.expires_at.isoformat(),
        "auto_approve": token.auto_approve,
        "max_devices": token.max_devices,
    }


def revoke_token(token: EnrollmentToken, *, actor: Actor) -> EnrollmentToken:
    """No device enrolls with it from now on; devices it enrolled keep their standing."""
    with transaction.atomic():
        now = timezone.now()
        if EnrollmentToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=now) == 1:
            record(
                actor,
                "enrollment_token.revoked",
                token,
                before={"revoked_at": None},
                after={"revoked_at": now.isoformat()},
            )
    token.refresh_from_db()
    return token


# --- Enrolling ---------------------------------------------------------------------------


def _public_key(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError):
        raise EnrollmentError("public_key must be an Ed25519 public key: 32 bytes in base64") from None


def check_device_id(device_id: str) -> None:
    """Refuse an id reserved for the plane's own broker logins (the admin, the plane, the bridge)."""
    lowered = device_id.lower()
    plane_logins = {
        (settings.MQTT_BROKER.username or "").lower(),
        (parse_broker_url(settings.MQTT_ADMIN_URL).username or "").lower() if settings.MQTT_ADMIN_URL else "",
    } - {""}
    if lowered in RESERVED_DEVICE_IDS | plane_logins or lowered.startswith(RESERVED_DEVICE_PREFIXES):
        raise EnrollmentError(f"{device_id!r} is reserved for the plane; choose another device id")


def enroll(secret: str, *, device_id: str, public_key: str, name: str = "", now: datetime | None = None) -> Device:
    """Register a device as pending (or accepted, if the token says so) under a valid token.

    Asking again with the same key is harmless and answers with the device's standing; another
    key for an existing device id is refused, so a token holder cannot take over a device.
    """
    now = now or timezone.now()
    _public_key(public_key)
    check_device_id(device_id)
    with transaction.atomic():
        # Lock the token: two devices racing for its last place would both take it.
        token = EnrollmentToken.objects.select_for_update().filter(token_hash=hash_token(secret)).first()
        if token is None or token.revoked_at is not None or token.expires_at <= now:
            raise EnrollmentError("the enrollment token is unknown, expired or revoked")
        device = Device.objects.select_for_update().filter(device_id=device_id).first()
        if device is not None:
            if device.public_key != public_key:
                raise EnrollmentError(f"{device_id} is already enrolled with another key")
            return device
        if token.max_devices is not None and token.devices.count() >= token.max_devices:
            raise EnrollmentError("the enrollment token has enrolled as many devices as it may")
        state = EnrollmentState.ACCEPTED if token.auto_approve else EnrollmentState.PENDING
        device = Device(device_id=device_id, name=name, public_key=public_key, enrollment_token=token, enrollment=state)
        device.full_clean(exclude=["tags"])
        device.save()
        record(
            f"device:{device_id}",
            "device.enrolled",
            device,
            after={"enrollment": state, "token": token.prefix, "public_key": public_key},
        )
    return device


def _move(device: Device, to: EnrollmentState, allowed_from: tuple[EnrollmentState, ...], *, actor: Actor) -> Device:
    with transaction.atomic():
        before = Device.objects.filter(pk=device.pk).values_list("enrollment", flat=True).first()
        if before not in allowed_from:
            raise EnrollmentError(f"{device.device_id} is {before}: it cannot become {to}")
        # Compare-and-swap: a concurrent verdict on the same device changes nothing twice.
        if Device.objects.filter(pk=device.pk, enrollment=before).update(enrollment=to) != 1:
            raise EnrollmentError(f"{device.device_id} changed meanwhile; try again")
        record(actor, f"device.{to}", device, before={"enrollment": before}, after={"enrollment": to})
    device.enrollment = to
    return device


def accept_device(device: Device, *, actor: Actor) -> Device:
    """The device may fetch broker credentials from now on."""
    return _move(device, EnrollmentState.ACCEPTED, (EnrollmentState.PENDING, EnrollmentState.REJECTED), actor=actor)


def reject_device(device: Device, *, actor: Actor) -> Device:
    return _move(device, EnrollmentState.REJECTED, (EnrollmentState.PENDING,), actor=actor)


def decommission_device(device: Device, *, actor: Actor) -> Device:
    """Take the device out of the fleet: its broker login is removed, and the broker disconnects it."""
    allowed = (EnrollmentState.PENDING, EnrollmentState.ACCEPTED, EnrollmentState.REJECTED)
    with transaction.atomic():
        # The lock issue_credentials holds across its broker call: a credentials request in
        # flight finishes first, and its login is then removed here, not created after.
        Device.objects.select_for_update().filter(pk=device.pk).first()
        device = _move(device, EnrollmentState.DECOMMISSIONED, allowed, actor=actor)
        Device.objects.filter(pk=device.pk).update(online=False)
        if settings.MQTT_DYNSEC:
            # Before the commit, not on it: if the broker cannot be told, the device stays as it
            # was and the operator sees the error, rather than a "decommissioned" device that
            # can still log in.
            from fleet.mqtt.broker_admin import dynsec_session

            with dynsec_session() as dynsec:
                dynsec.remove_device(device.device_id)
    return device


# --- Credentials -------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    device_id: str
    state: str
    username: str | None = None
    password: str | None = None
    broker_url: str | None = None


def issue_credentials(device_id: str, *, timestamp_ms: int, signature: str, now: float | None = None) -> Credentials:
    """A fresh broker password for an accepted device that signed a fresh timestamp with its key.

    Pending devices learn they are pending and nothing else. The timestamp must be within
    ENROLLMENT_CLOCK_SKEW of the plane's clock and newer than the last one used, so a
    captured request cannot be replayed to take the device's login.
    """
    now = time.time() if now is None else now
    device = Device.objects.filter(device_id=device_id).exclude(public_key="").first()
    if device is None:
        raise NotAccepted("unknown device or bad signature")
    try:
        _public_key(device.public_key).verify(
            base64.b64decode(signature, validate=True), signed_message(device_id, timestamp_ms)
        )
    except (InvalidSignature, binascii.Error, ValueError):
        raise NotAccepted("unknown device or bad signature") from None
    if abs(timestamp_ms / 1000 - now) > settings.ENROLLMENT_CLOCK_SKEW:
        raise EnrollmentError("the signed timestamp is too far from the plane's clock")
    if device.enrollment == EnrollmentState.PENDING:
        return Credentials(device_id, device.enrollment)
    with transaction.atomic():
        # Held until the broker has the new password: a decommission racing this request waits
        # for it and then removes the login, instead of removing nothing and seeing it created
        # behind its back (decommission_device takes the same lock).
        state = Device.objects.select_for_update().filter(pk=device.pk).values_list("enrollment", flat=True).first()
        if state != EnrollmentState.ACCEPTED:
            raise NotAccepted(f"{device_id} is {state}")
        # Compare-and-swap on the newest timestamp: a replayed request gets nothing.
        if (
            Device.objects.filter(pk=device.pk, credentials_signed_at__lt=timestamp_ms).update(
                credentials_signed_at=timestamp_ms
            )
            != 1
        ):
            raise NotAccepted("this signed request was already used")
        record(f"device:{device_id}", "device.credentials_issued", device, after={"signed_at": timestamp_ms})
        if not settings.MQTT_DYNSEC:
            # The broker does not check device logins: the device keeps the broker settings it has.
            return Credentials(device_id, state, broker_url=_device_broker_url())
        password = secrets.token_urlsafe(24)
        from fleet.mqtt.broker_admin import dynsec_session
        from fleet.mqtt.dynsec import device_username

        with dynsec_session() as dynsec:
            dynsec.set_device_password(device_id, password)
    return Credentials(device_id, state, device_username(device_id), password, _device_broker_url())


def _device_broker_url() -> str:
    if settings.MQTT_DEVICE_URL:
        return settings.MQTT_DEVICE_URL
    broker = settings.MQTT_BROKER
    return f"{'mqtts' if broker.tls else 'mqtt'}://{broker.host}:{broker.port}"


def may_speak(enrollment_state: str | None) -> bool:
    """The one answer to "may this device speak?", given its enrollment (None: never seen).

    An accepted device may. A pending, rejected or decommissioned one may not, whatever
    the settings: decommissioning must stop a device even where the broker does not check
    logins. A device never seen may register by its hello only where enrollment is not
    required (it is then accepted by default).
    """
    if enrollment_state is None:
        return not settings.ENROLLMENT_REQUIRED
    return enrollment_state == EnrollmentState.ACCEPTED


def speaking_devices(device_ids: Iterable[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Of these device ids, in one query: the pks of those that may speak, and why each of the
    others may not (its enrollment state, or "not enrolled"). An id in neither answer was never
    seen and may register by its hello (``may_speak(None)``). The bridge calls this once a flush.
    """
    known = {
        device_id: (pk, state)
        for device_id, pk, state in Device.objects.filter(device_id__in=set(device_ids)).values_list(
            "device_id", "pk", "enrollment"
        )
    }
    speaking = {device_id: pk for device_id, (pk, state) in known.items() if may_speak(state)}
    refused = {device_id: state for device_id, (_, state) in known.items() if not may_speak(state)}
    if not may_speak(None):
        refused |= {device_id: "not enrolled" for device_id in set(device_ids) - known.keys()}
    return speaking, refused


def refused_device_pks(pks: Iterable[int]) -> set[int]:
    """Of these known devices, those that may no longer speak; the bridge calls this."""
    return set(
        Device.objects.filter(pk__in=list(pks))
        .exclude(enrollment=EnrollmentState.ACCEPTED)
        .values_list("pk", flat=True)
    )
