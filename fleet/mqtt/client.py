"""The plane's paho clients, configured from settings. Nothing connects at import."""

from __future__ import annotations

import socket
import ssl
import uuid

import paho.mqtt.client as mqtt
from django.conf import settings

from agent.wire import BrokerUrl


def set_nodelay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    # Request/reply over MQTT stalls on Nagle meeting delayed ACKs without this.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(role: str, *, broker: BrokerUrl | None = None) -> mqtt.Client:
    """A paho client with a unique id, credentials, TLS and TCP_NODELAY; not yet connected."""
    broker = broker or settings.MQTT_BROKER
    client = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"{settings.MQTT_CLIENT_PREFIX}-{role}-{uuid.uuid4().hex[:8]}",
        protocol=mqtt.MQTTv5 if broker.mqtt_v5 else mqtt.MQTTv311,
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


def connect(client: mqtt.Client, *, broker: BrokerUrl | None = None, keepalive: int = 30) -> None:
    """Start connecting in paho's loop thread: a broker that is down now is retried, not fatal."""
    broker = broker or settings.MQTT_BROKER
    client.reconnect_delay_set(min_delay=1, max_delay=30)
    client.connect_async(broker.host, broker.port, keepalive=keepalive)
