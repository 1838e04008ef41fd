"""The plane's paho client against the real Mosquitto: buffered reads, and acknowledgements
queued by its network thread without paho's wake-up byte."""

import queue
import threading

import paho.mqtt.client as mqtt

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
