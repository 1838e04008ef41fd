"""The agent's one adapter over paho-mqtt.

It owns paho's network thread, reconnects on its own, sets the last-will, and
hands inbound messages over through a bounded queue so that the agent never does
its work on paho's thread. paho's error codes become LinkError here; nothing
above this module imports paho.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, NamedTuple, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.config import TlsConfig
from agent.contract import wire

log = logging.getLogger(__name__)

INBOUND_LIMIT: Final = 1024
OUTBOUND_LIMIT: Final = 1000
KEEPALIVE_S: Final = 30
RECONNECT_MIN_S: Final = 1
RECONNECT_MAX_S: Final = 30


class LinkError(Exception):
    """The broker link refused an operation. The text says why."""


class Inbound(NamedTuple):
    topic: str
    payload: bytes


class Will(NamedTuple):
    topic: str
    payload: bytes


class Link(Protocol):
    """What the agent needs from a broker connection; MqttLink and the tests' FakeLink provide it."""

    messages: queue.Queue[Inbound]
    on_connected: Callable[[], None] | None

    @property
    def connected(self) -> bool: ...

    def connect(self) -> None: ...

    def subscribe(self, topics: Sequence[str], qos: int = 1) -> None: ...

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...

    def deliver(self, topic: str, payload: bytes, on_acked: Callable[[], None]) -> None:
        """Publish with QoS 1; call ``on_acked`` (on any thread) once the broker has acknowledged it."""
        ...

    def close(self, farewell: Inbound | None = None, timeout: float = 2.0) -> None: ...


class MqttLink:
    """A paho client that reconnects by itself; (re)connects call ``on_connected``."""

    def __init__(
        self,
        broker: wire.BrokerUrl,
        *,
        client_id: str,
        will: Will,
        tls: TlsConfig | None = None,
        inbound_limit: int = INBOUND_LIMIT,
    ) -> None:
        self.broker = broker
        self.messages: queue.Queue[Inbound] = queue.Queue(maxsize=inbound_limit)
        self.on_connected: Callable[[], None] | None = None
        self.dropped = 0
        self._up = threading.Event()
        self._closing = False
        self._client = _build_client(broker, client_id, will, tls or TlsConfig())
        self._client.on_connect = self._handle_connect
        self._client.on_disconnect = self._handle_disconnect
        self._client.on_message = self._handle_message
        self._client.on_socket_open = _no_delay
        self._client.on_publish = self._handle_publish
        self._acks: dict[int, Callable[[], None]] = {}
        self._early_acks: set[int] = set()
        self._delivering = 0
        self._acks_lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def connect(self) -> None:
        """Start connecting in paho's thread; it retries until the broker answers."""
        try:
            self._client.connect_async(self.broker.host, self.broker.port, keepalive=KEEPALIVE_S)
        except (OSError, ValueError) as exc:
            raise LinkError(f"cannot connect to {self.broker.host}:{self.broker.port}: {exc}") from exc
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._up.wait(timeout)

    def subscribe(self, topics: Sequence[str], qos: int = 1) -> None:
        try:
            rc, _ = self._client.subscribe([(name, qos) for name in topics])
        except ValueError as exc:
            raise LinkError(f"cannot subscribe to {list(topics)}: {exc}") from exc
        _check(rc, f"subscribe to {list(topics)}")

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a publish. While the broker is away, QoS 1 messages wait in paho's bounded queue."""
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise LinkError(f"cannot publish on {topic}: {exc}") from exc
        if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN or qos == 0:
            _check(info.rc, f"publish on {topic}")

    def deliver(self, topic: str, payload: bytes, on_acked: Callable[[], None]) -> None:
        """Publish with QoS 1 and call ``on_acked`` on the PUBACK.

        While the broker is away paho keeps the message and sends it again on
        reconnect, so the callback may come much later; never twice.
        """
        with self._acks_lock:
            self._delivering += 1
        try:
            info = self._publish_qos1(topic, payload)
            with self._acks_lock:
                acked_already = info.mid in self._early_acks
                if acked_already:
                    self._early_acks.discard(info.mid)
                else:
                    self._acks[info.mid] = on_acked
        finally:
            with self._acks_lock:
                self._delivering -= 1
                if not self._delivering:
                    self._early_acks.clear()  # acks of plain publishes, which nobody waits for
        if acked_already:
            on_acked()

    def _publish_qos1(self, topic: str, payload: bytes) -> paho.MQTTMessageInfo:
        try:
            info = self._client.publish(topic, payload, qos=1)
        except ValueError as exc:
            raise LinkError(f"cannot publish on {topic}: {exc}") from exc
        if info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            _check(info.rc, f"publish on {topic}")
        return info

    def _handle_publish(self, client: paho.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # paho calls this holding its own lock, possibly before deliver() has seen the mid.
        with self._acks_lock:
            callback = self._acks.pop(mid, None)
            if callback is None and self._delivering:
                self._early_acks.add(mid)
        if callback is not None:
            try:
                callback()
            except Exception:
                log.exception("mqtt.on_acked_failed mid=%d", mid)

    def close(self, farewell: Inbound | None = None, timeout: float = 2.0) -> None:
        """Say goodbye if connected, then disconnect cleanly so the broker drops the last-will."""
        self._closing = True
        if farewell is not None and self.connected:
            self._send_and_wait(farewell, timeout)
        self._client.disconnect()
        self._client.loop_stop()

    def _send_and_wait(self, message: Inbound, timeout: float) -> None:
        try:
            self._client.publish(message.topic, message.payload, qos=1).wait_for_publish(timeout)
        except (ValueError, RuntimeError) as exc:
            log.warning("mqtt.farewell_failed topic=%s error=%r", message.topic, str(exc))

    def _handle_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt.refused broker=%s:%s reason=%r", self.broker.host, self.broker.port, str(reason))
            return
        log.info("mqtt.connected broker=%s:%s protocol=%s", self.broker.host, self.broker.port, self.broker.protocol)
        if self.on_connected is not None:
            try:
                self.on_connected()
            except Exception:
                log.exception("mqtt.on_connected_failed")
        self._up.set()  # after the hook, so wait_connected() means subscribed and announced

    def _handle_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._up.clear()
        level = logging.INFO if self._closing else logging.WARNING
        log.log(level, "mqtt.disconnected reason=%r", str(reason))

    def _handle_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        # Dropping beats blocking paho's thread: it also runs keepalives, and a
        # lost chunk is re-requested by the transfer's stall timer anyway.
        try:
            self.messages.put_nowait(Inbound(message.topic, bytes(message.payload)))
        except queue.Full:
            self.dropped += 1
            log.warning("mqtt.inbound_full topic=%s dropped=%d", message.topic, self.dropped)


def _build_client(broker: wire.BrokerUrl, client_id: str, will: Will, tls: TlsConfig) -> paho.Client:
    client = paho.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=paho.MQTTv5 if broker.mqtt_v5 else paho.MQTTv311,
    )
    client.will_set(will.topic, will.payload, qos=1)
    client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)
    client.max_queued_messages_set(OUTBOUND_LIMIT)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        _set_tls(client, tls)
    return client


def _set_tls(client: paho.Client, tls: TlsConfig) -> None:
    try:
        client.tls_set(ca_certs=tls.ca_file or None, certfile=tls.cert_file or None, keyfile=tls.key_file or None)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise LinkError(f"cannot set up TLS: {exc}") from exc


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    # Chunk request/reply is small-message ping-pong: with Nagle and delayed ACKs
    # it stalls at about 23 chunks a second.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:
        log.debug("mqtt.nodelay_failed error=%r", str(exc))


def _check(rc: int, what: str) -> None:
    if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
        raise LinkError(f"{what} failed: {paho.error_string(rc)}")
