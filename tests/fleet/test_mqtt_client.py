"""The plane's paho client against the real Mosquitto: buffered reads, and acknowledgements
queued by its network thread without paho's wake-up byte."""

import queue
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from fleet.mqtt.client import BufferedClient

MESSAGES = 3000  # far over the broker's 100 unacknowledged QoS 1 messages a client (mosquitto.conf)


def connected(client: mqtt.Client, port: int) -> mqtt.Client:
    ready = threading.Event()
    client.on_connect = lambda *args: ready.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert ready.wait(10), "the broker did not answer CONNECT"
    return client


def client(cls: type[mqtt.Client], name: str) -> mqtt.Client:
    return cls(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, client_id=name)


def test_it_acknowledges_every_qos1_message_so_the_broker_keeps_delivering(broker_port):
    received: list[int] = []
    done = threading.Event()
    subscribed = threading.Event()

    def on_message(c, userdata, message) -> None:
        received.append(int(message.payload))
        if len(received) == MESSAGES:
            done.set()

    subscriber = client(BufferedClient, "buffered-subscriber")
    subscriber.on_message = on_message
    subscriber.on_subscribe = lambda *args: subscribed.set()
    connected(subscriber, broker_port)
    subscriber.subscribe("buffered/acks/#", qos=1)
    publisher = connected(client(mqtt.Client, "stock-publisher"), broker_port)
    try:
        assert subscribed.wait(10)
        for n in range(MESSAGES):
            publisher.publish("buffered/acks/one", str(n), qos=1)

        # Unacknowledged, the broker would stop at its inflight limit of 100.
        assert done.wait(60), f"{len(received)} of {MESSAGES} delivered"
        assert received == list(range(MESSAGES))
    finally:
        for c in (publisher, subscriber):
            c.disconnect()
            c.loop_stop()


def test_it_still_sends_at_once_what_another_thread_publishes(broker_port):
    arrived: queue.Queue[bytes] = queue.Queue()
    listener = client(mqtt.Client, "stock-listener")
    subscribed = threading.Event()
    listener.on_message = lambda c, userdata, message: arrived.put(message.payload)
    listener.on_subscribe = lambda *args: subscribed.set()
    connected(listener, broker_port)
    listener.subscribe("buffered/out", qos=1)
    sender = connected(client(BufferedClient, "buffered-sender"), broker_port)
    try:
        assert subscribed.wait(10)
        for n in range(20):
            sender.publish("buffered/out", f"m{n}", qos=1)  # from this thread, not the network thread

        assert [arrived.get(timeout=10) for _ in range(20)] == [f"m{n}".encode() for n in range(20)]
    finally:
        for c in (sender, listener):
            c.disconnect()
            c.loop_stop()


def test_ack_many_acknowledges_a_batch_so_the_broker_redelivers_only_what_it_left_out(broker_port):
    """The bridge's acknowledgement: a batch's PUBACKs in one write, from another thread.

    Acknowledged messages are gone from the session; the ones left out come back on the next
    connection of the same session, and nothing else does.
    """
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    def session_client() -> BufferedClient:
        c = client(BufferedClient, "buffered-ack-many")
        c.manual_ack_set(True)
        return c

    def connect_session(c: mqtt.Client) -> None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 60
        ready = threading.Event()
        c.on_connect = lambda *args: ready.set()
        c.connect("127.0.0.1", broker_port, clean_start=False, properties=properties)
        c.loop_start()
        assert ready.wait(10)

    received: queue.Queue[tuple[int, int]] = queue.Queue()
    subscriber = session_client()
    subscriber.on_message = lambda c, userdata, message: received.put((int(message.payload), message.mid))
    subscribed = threading.Event()
    subscriber.on_subscribe = lambda *args: subscribed.set()
    connect_session(subscriber)
    subscriber.subscribe("buffered/ack-many", qos=1)
    publisher = connected(client(mqtt.Client, "ack-many-publisher"), broker_port)
    held_back = 50
    try:
        assert subscribed.wait(10)
        for n in range(MESSAGES):
            publisher.publish("buffered/ack-many", str(n), qos=1)
        got: list[tuple[int, int]] = [received.get(timeout=30) for _ in range(MESSAGES)]
        assert [n for n, _ in got] == list(range(MESSAGES))
        acknowledged = got[:-held_back]
        for start in range(0, len(acknowledged), 500):  # batches, as the bridge acknowledges them
            subscriber.ack_many(mid for _, mid in acknowledged[start : start + 500])
        time.sleep(0.5)  # the network thread writes them
    finally:
        subscriber.disconnect()
        subscriber.loop_stop()
        publisher.disconnect()
        publisher.loop_stop()

    again: queue.Queue[int] = queue.Queue()
    returned = session_client()
    returned.on_message = lambda c, userdata, message: (again.put(int(message.payload)), c.ack(message.mid, 1))
    connect_session(returned)
    try:
        redelivered = [again.get(timeout=10) for _ in range(held_back)]
        assert redelivered == list(range(MESSAGES - held_back, MESSAGES))
        with pytest.raises(queue.Empty):
            again.get(timeout=1.0)
    finally:
        returned.disconnect(properties=_end_session())
        returned.loop_stop()


def _end_session():
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    properties = Properties(PacketTypes.DISCONNECT)
    properties.SessionExpiryInterval = 0
    return properties
