"""The plane's paho clients, configured from settings. Nothing connects at import."""

from __future__ import annotations

import socket
import ssl
import struct
import threading
import uuid
from collections.abc import Iterable
from typing import Any

import paho.mqtt.client as mqtt
from django.conf import settings
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.contract.wire import BrokerUrl

_PUBACK = struct.Struct("!BBH")


def set_nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    # Request/reply over MQTT stalls on Nagle meeting delayed ACKs without this.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BufferedClient(mqtt.Client):
    """paho's client, reading its socket 64 KiB at a time and acknowledging without a wake-up.

    Stock paho 2.2 reads a packet with three recv calls (command byte, length
    bytes, body) and one select per packet; at thousands of heartbeats a second
    those syscalls are most of the bridge's receive cost (docs/benchmarks.md).
    This overrides paho's private ``_sock_recv`` (pinned in requirements/plane.txt)
    to serve those reads from a buffer, and drains the buffer on each readable event.

    It also overrides the private ``_packet_queue``: for every packet queued, paho
    writes a byte to a socketpair to wake its network thread out of ``select``. For
    the PUBACK of each QoS 1 message, queued by the network thread itself, that is a
    syscall and a spurious wake-up per message (12% of a saturated bridge's samples);
    the thread's next ``select`` sees ``want_write()`` and sends the PUBACK anyway.
    """

    _READ_BYTES = 65536

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rbuf = b""
        self._rpos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            # Raises BlockingIOError when there is nothing, as paho expects.
            self._rbuf, self._rpos = super()._sock_recv(self._READ_BYTES), 0
            if not self._rbuf:
                return b""
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def _sock_close(self) -> None:
        self._rbuf, self._rpos = b"", 0
        super()._sock_close()

    def _packet_queue(
        self, command: int, packet: bytes | bytearray, mid: int, qos: int, info: mqtt.MQTTMessageInfo | None = None
    ) -> mqtt.MQTTErrorCode:
        if self._thread is None or threading.current_thread() is not self._thread:
            return super()._packet_queue(command, packet, mid, qos, info)
        # As paho's, less the wake-up byte (and the external-loop hook, unused with loop_start).
        self._out_packet.append(
            {"command": command, "mid": mid, "qos": qos, "pos": 0, "to_process": len(packet), "packet": packet,
             "info": info}
        )  # fmt: skip
        return mqtt.MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Iterable[int]) -> None:
        """PUBACK each QoS 1 message id (manual acknowledgement): one write and one wake-up for them all.

        paho's ``ack`` queues a packet and wakes the network thread once a message, and the
        thread sends each 4-byte PUBACK with its own syscall: for a batch of a thousand
        heartbeats acknowledged after their commit, thousands of syscalls. Here the batch's
        PUBACKs are one queued packet, which paho writes as it writes any other (a PUBACK
        has no completion callback).
        """
        packet = b"".join([_PUBACK.pack(mqtt.PUBACK, 2, mid) for mid in mids])
        if not packet:
            return
        self._out_packet.append(
            {"command": mqtt.PUBACK, "mid": 0, "qos": 1, "pos": 0, "to_process": len(packet), "packet": packet,
             "info": None}
        )  # fmt: skip
        if self._sockpairW is not None:
            try:
                self._sockpairW.send(b"0")
            except BlockingIOError:
                pass

    def loop_read(self, max_packets: int = 1) -> mqtt.MQTTErrorCode:
        rc = super().loop_read(max_packets)
        # Bytes already buffered never make the socket readable again: handle them now.
        while rc == mqtt.MQTT_ERR_SUCCESS and self._rpos < len(self._rbuf) and self._sock is not None:
            rc = super().loop_read(max_packets)
        return rc


def make_client(role: str, *, broker: BrokerUrl | None = None, name: str = "") -> BufferedClient:
    """A paho client with credentials, TLS and TCP_NODELAY; not yet connected.

    Its id is unique (a random suffix) unless ``name`` is given: a named client keeps its id
    across restarts, which a persistent session needs (``connect(session_expiry=...)``).
    """
    broker = broker or settings.MQTT_BROKER
    client = BufferedClient(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{settings.MQTT_CLIENT_PREFIX}-{role}-{name or uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if broker.mqtt_v5 else mqtt.MQTTv311,
        # MQTT 3.1.1 says at construction whether the session outlives the connection.
        clean_session=None if broker.mqtt_v5 else not name,
    )
    client.on_socket_open = set_nodelay
    if broker.username:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls:
        client.tls_set(
            ca_certs=settings.MQTT_CA_FILE or None,
            certfile=settings.MQTT_CERT_FILE or None,
            keyfile=settings.MQTT_KEY_FILE or None,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    return client


def connect(
    client: mqtt.Client, *, broker: BrokerUrl | None = None, keepalive: int = 30, session_expiry: int = 0
) -> None:
    """Start connecting in paho's loop thread: a broker that is down now is retried, not fatal.

    With ``session_expiry`` (seconds, MQTT v5), the broker keeps the client's session that long
    after it goes: what it had not acknowledged, and what came for it meanwhile, is delivered
    when a client of the same id comes back.
    """
    broker = broker or settings.MQTT_BROKER
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    if session_expiry and broker.mqtt_v5:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
        client.connect_async(broker.host, broker.port, keepalive=keepalive, clean_start=False, properties=properties)
    else:
        client.connect_async(broker.host, broker.port, keepalive=keepalive)
