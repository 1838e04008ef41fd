"""The plane's admin login to the broker, for the dynamic-security commands of enrollment."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import msgspec
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from agent.contract.wire import parse_broker_url
from fleet.mqtt.client import make_client
from fleet.mqtt.dynsec import DynSec, DynSecError


@contextmanager
def dynsec_session(timeout: float = 10.0) -> Iterator[DynSec]:
    """A connected DynSec over MQTT_ADMIN_URL; one short connection per use, as uses are rare."""
    broker = parse_broker_url(settings.MQTT_ADMIN_URL)
    if settings.MQTT_ADMIN_PASSWORD:
        broker = msgspec.structs.replace(broker, password=settings.MQTT_ADMIN_PASSWORD)
    client = make_client("admin", broker=broker)
    connected = threading.Event()
    refused: list[str] = []

    def on_connect(client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            refused.append(str(reason_code))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(broker.host, broker.port)
    except OSError as exc:
        raise DynSecError(f"cannot reach the broker at {broker.host}:{broker.port} ({exc})") from None
    client.loop_start()
    try:
        if not connected.wait(timeout) or refused:
            raise DynSecError(f"the broker refused the plane's admin login: {refused or 'no answer'}")
        yield DynSec(client, timeout=timeout)
    finally:
        client.disconnect()
        client.loop_stop()


def prepare_broker() -> str:
    """Deny by default, create or refresh the bridge's role, and give the plane (MQTT_URL) its login.

    Idempotent: ``manage.py setup_broker`` runs it at every start of the stack, which also
    rotates the plane's password when MQTT_PASSWORD(_FILE) changed. Returns the plane's username.
    """
    plane = settings.MQTT_BROKER
    admin = parse_broker_url(settings.MQTT_ADMIN_URL)
    if not plane.username or not plane.password:
        raise ImproperlyConfigured("MQTT_URL names no user, or no password (MQTT_PASSWORD or MQTT_PASSWORD_FILE)")
    if plane.username == admin.username:
        raise ImproperlyConfigured("the plane's login (MQTT_URL) must not be the broker's admin (MQTT_ADMIN_URL)")
    with dynsec_session() as dynsec:
        dynsec.ensure_roles()
        dynsec.set_bridge_login(plane.username, plane.password)
    return plane.username
