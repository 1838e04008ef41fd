"""Light devices for rollout tests: paho clients that speak the real protocol through agent.contract.wire.

A simulated device says hello, answers each desired state by reporting downloading,
verifying and active (or failed, for the versions it is told to fail), and sends the
heartbeats a test asks for. It downloads no chunks.
"""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt

from agent.contract import wire


class SimulatedDevice:
    def __init__(self, device_id: str, port: int, *, fails: set[str] = frozenset()) -> None:
        self.device_id = device_id
        self.port = port
        # Version numbers (as in Desired.version) this device fails to activate.
        self.fails = set(fails)
        # (deployment_id, version) of every desired state received, in order.
        self.received: list[tuple[int | None, str]] = []
        self.active: wire.ActiveModel | None = None
        self.seq = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sim-{device_id}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def start(self) -> SimulatedDevice:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError(f"{self.device_id} did not subscribe")
        self._publish(wire.Channel.HELLO, self._hello())
        return self

    def stop(self) -> None:
        # Disconnect first: it wakes paho's loop, which then ends at once. Stopped first, the
        # loop finishes its one-second select before it notices.
        self.client.disconnect()
        self.client.loop_stop()

    def versions_received(self) -> list[str]:
        with self._lock:
            return [version for deployment_id, version in self.received if deployment_id is not None]

    def beat(
        self, *, p95_ms: float, count: int, errors: int = 0, generation: wire.GenerationStats | None = None
    ) -> None:
        """One heartbeat covering ``count`` inference calls at this p95 (and chat completions, if given)."""
        self.seq += 1
        latency = wire.LatencyStats(count=count, p50_ms=p95_ms / 2, p95_ms=p95_ms, p99_ms=p95_ms, max_ms=p95_ms)
        beat = wire.Heartbeat(
            device_id=self.device_id,
            seq=self.seq,
            sent_at=time.time(),
            interval_s=30,
            uptime_s=float(self.seq),
            cpu_percent=1.0,
            mem_rss_bytes=1 << 20,
            mem_available_bytes=1 << 30,
            active=self.active,
            requests=count,
            errors=errors,
            latency=latency if count else None,
            generation=generation,
        )
        self._publish(wire.Channel.HEARTBEAT, beat)

    # --- paho's thread ------------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        client.subscribe(wire.topic(self.device_id, wire.Channel.DESIRED), qos=1)

    def _on_message(self, client, userdata, message) -> None:
        desired = wire.decode(wire.Channel.DESIRED, message.payload)
        with self._lock:
            self.received.append((desired.deployment_id, desired.version))
        if desired.deployment_id is None:
            return
        if self.active and self.active.deployment_id == desired.deployment_id:
            return
        sha256 = next(f.sha256 for f in desired.files if f.role == "model")
        self._report(desired.deployment_id, "downloading")
        self._report(desired.deployment_id, "verifying")
        if desired.version in self.fails:
            self._report(desired.deployment_id, "failed", error="the model did not load")
            return
        self._report(desired.deployment_id, "active", sha256=sha256)
        self.active = wire.ActiveModel(deployment_id=desired.deployment_id, sha256=sha256)

    def _report(self, deployment_id: int, state: str, **fields) -> None:
        report = wire.StateReport(
            device_id=self.device_id, deployment_id=deployment_id, state=state, sent_at=time.time(), **fields
        )
        self._publish(wire.Channel.STATE, report)

    def _hello(self) -> wire.Hello:
        return wire.Hello(
            device_id=self.device_id,
            hardware=wire.HardwareProfile(
                arch="x86_64", os="linux", cpu_count=2, ram_bytes=4 << 30, providers=["CPUExecutionProvider"]
            ),
            active=self.active,
            sent_at=time.time(),
        )

    def _publish(self, channel: wire.Channel, message: wire.Message) -> None:
        self.client.publish(wire.topic(self.device_id, channel), wire.encode(message), qos=1)
