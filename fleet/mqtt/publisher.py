"""Publishing from the plane's web and worker processes: desired state, retained.

The publisher connects lazily on first use and is reused by the process. Tests
install a fake with ``install()``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Protocol

import paho.mqtt.client as mqtt

from fleet.mqtt.client import connect, make_client

log = logging.getLogger(__name__)


class PublishFailed(Exception):
    pass


class Publisher(Protocol):
    def publish_many(self, messages: Iterable[tuple[str, bytes, bool]], *, timeout: float = 30.0) -> int: ...


class MqttPublisher:
    """A connected paho client that publishes at QoS 1 and waits for the broker's acks."""

    def __init__(self, client: mqtt.Client | None = None) -> None:
        self.client = client or make_client("publisher")
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *args: self._connected.clear()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if not reason_code.is_failure:
            self._connected.set()

    def start(self, timeout: float = 10.0) -> None:
        connect(self.client)
        self.client.loop_start()
        if not self._connected.wait(timeout):
            self.client.loop_stop()
            raise PublishFailed("the broker did not accept the connection in time; check MQTT_URL")

    def publish_many(self, messages: Iterable[tuple[str, bytes, bool]], *, timeout: float = 30.0) -> int:
        infos = [self.client.publish(topic, payload, qos=1, retain=retain) for topic, payload, retain in messages]
        for info in infos:
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise PublishFailed(f"the broker did not acknowledge a publish within {timeout}s")
        return len(infos)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_lock = threading.Lock()
_publisher: Publisher | None = None


def get_publisher() -> Publisher:
    global _publisher
    with _lock:
        if _publisher is None:
            publisher = MqttPublisher()
            publisher.start()
            _publisher = publisher
        return _publisher


def install(publisher: Publisher | None) -> Publisher | None:
    """Swap the process's publisher (tests); returns the one it replaced."""
    global _publisher
    with _lock:
        previous, _publisher = _publisher, publisher
    return previous
