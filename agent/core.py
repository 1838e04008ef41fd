"""The agent: wires the broker link, the runner, the deployment jobs, heartbeats and local HTTP.

Built from what it is given (``Agent(config, mqtt, runner, clock)``) and connects
nothing until ``start``. paho's thread only queues messages; the agent's own
pump thread decodes and routes them, and one bad message is logged and counted,
never fatal.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Final

import msgspec

from agent import wire
from agent.active import ActiveDeployment, load_active, save_active
from agent.clock import Clock
from agent.config import Config
from agent.deployment import DeploymentJob
from agent.files import write_atomic
from agent.hardware import detect_profile
from agent.mqtt import Inbound, Link, LinkError
from agent.runtime import ModelLoadError, Runner
from agent.server import InferenceServer
from agent.telemetry import HeartbeatBuilder, LatencyRecorder
from agent.transfer import find_artifact

log = logging.getLogger(__name__)

FIRST_HEARTBEAT_MAX_S: Final = 2.0
# A hello sent while no bridge listened is lost; say it again until the plane answers.
HELLO_RETRY_S: Final = (5.0, 300.0)
PUMP_POLL_S: Final = 0.2
JOIN_TIMEOUT_S: Final = 5.0


class Agent:
    """One device's agent. ``start`` it, then ``stop`` it; both are safe to call from any thread."""

    def __init__(self, config: Config, mqtt: Link, runner: Runner, clock: Clock) -> None:
        self.config = config
        self.mqtt = mqtt
        self.runner = runner
        self.clock = clock
        self.device_id = config.device_id
        self.data_dir = config.data_path
        self.recorder = LatencyRecorder()
        self.heartbeats = HeartbeatBuilder(self.device_id, clock, self.recorder)
        self.malformed = 0
        self.server: InferenceServer | None = None
        self.active: ActiveDeployment | None = None
        self._job: DeploymentJob | None = None
        self._lock = threading.Lock()  # guards _job and active: the pump and jobs both touch them
        self._stopping = threading.Event()
        # Set once the plane has answered since the last (re)connect: any desired message will do.
        self.heard_from_plane = threading.Event()
        self.hello_retry = HELLO_RETRY_S
        self._threads: list[threading.Thread] = []

    def topic(self, channel: wire.Channel) -> str:
        return wire.topic(self.device_id, channel)

    # --- life cycle -----------------------------------------------------------

    def start(self) -> None:
        for sub in ("artifacts", "downloads"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        self._restore_active()
        self._start_server()
        self.mqtt.on_connected = self._on_connected
        self.mqtt.connect()
        self._spawn(self._pump, "agent-pump")
        self._spawn(self._beat, "agent-heartbeat")
        self._spawn(self._greet, "agent-hello")
        log.info("agent.started device_id=%s data_dir=%s", self.device_id, self.data_dir)

    def stop(self, reason: str = "shutdown") -> None:
        """Say goodbye, disconnect cleanly (so the broker drops the last-will) and stop serving."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel()
        goodbye = wire.Presence(device_id=self.device_id, online=False, reason=reason)
        self.mqtt.close(farewell=Inbound(self.topic(wire.Channel.PRESENCE), wire.encode(goodbye)))
        if self.server is not None:
            self.server.stop()
        for thread in self._threads:
            thread.join(JOIN_TIMEOUT_S)
        if job is not None:
            job.join(JOIN_TIMEOUT_S)
        log.info("agent.stopped device_id=%s reason=%s", self.device_id, reason)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _start_server(self) -> None:
        http = self.config.http
        self.server = InferenceServer(self.runner, self.recorder, host=http.host, port=http.port)
        self.server.start()
        # With port 0 the kernel picks; whoever starts us reads the real one here.
        write_atomic(self.data_dir / "http.port", f"{self.server.port}\n".encode())

    def _restore_active(self) -> None:
        """Load the model this device ran before it restarted, from disk alone."""
        active = load_active(self.data_dir)
        if active is None:
            return
        try:
            self._load_stored(active)
        except (ModelLoadError, FileNotFoundError) as exc:
            log.error("agent.restore_failed deployment_id=%d error=%r", active.deployment_id, str(exc))
            return
        self.active = active
        log.info("agent.restored deployment_id=%d sha256=%s", active.deployment_id, active.sha256[:12])

    def _load_stored(self, active: ActiveDeployment) -> None:
        model = find_artifact(self.data_dir, active.sha256)
        tokenizer = find_artifact(self.data_dir, active.tokenizer_sha256) if active.tokenizer_sha256 else None
        if model is None or (active.tokenizer_sha256 and tokenizer is None):
            raise FileNotFoundError(f"artifacts of deployment {active.deployment_id} are missing or damaged")
        self.runner.load(model, spec=active.inference, info=active.info, tokenizer_path=tokenizer)

    # --- connection -------------------------------------------------------------

    def _on_connected(self) -> None:
        # Runs on paho's thread at every (re)connect: only cheap, non-blocking work here.
        self.heard_from_plane.clear()
        self.mqtt.subscribe([self.topic(wire.Channel.DESIRED), self.topic(wire.Channel.CHUNK_DATA)], qos=1)
        self._publish(wire.Channel.HELLO, self._hello())
        self._publish(wire.Channel.PRESENCE, wire.Presence(device_id=self.device_id, online=True, reason="connected"))
        with self._lock:
            job = self._job
        if job is not None:
            job.nudge()  # chunk replies sent while we were away are lost: ask again now

    def _hello(self) -> wire.Hello:
        return wire.Hello(
            device_id=self.device_id,
            name=self.config.name,
            hardware=detect_profile(self.data_dir),
            active=self._active_model(),
            sent_at=self.clock.time(),
        )

    def _active_model(self) -> wire.ActiveModel | None:
        active = self.active
        return active.active_model if active else None

    def _publish(self, channel: wire.Channel, message: wire.Message, qos: int = 1) -> None:
        try:
            self.mqtt.publish(self.topic(channel), wire.encode(message), qos=qos)
        except LinkError as exc:
            log.warning("agent.publish_failed channel=%s error=%r", channel, str(exc))

    # --- inbound ------------------------------------------------------------------

    def _pump(self) -> None:
        while not self._stopping.is_set():
            try:
                message = self.mqtt.messages.get(timeout=PUMP_POLL_S)
            except queue.Empty:
                continue
            self.handle(message)

    def handle(self, message: Inbound) -> None:
        """Route one inbound message; a bad one is counted and logged, never raised."""
        try:
            device_id, channel = wire.parse_topic(message.topic)
            if device_id != self.device_id:
                raise wire.WireError(f"topic {message.topic!r} is not this device's")
            if channel is wire.Channel.CHUNK_DATA:
                self._on_chunk(wire.decode_chunk(message.payload))
            elif channel is wire.Channel.DESIRED:
                self._on_desired_payload(message)
        except wire.WireError as exc:
            self._count_malformed(message.topic, str(exc))
        except Exception as exc:
            log.exception("agent.handle_failed topic=%s", message.topic)
            self._count_malformed(message.topic, f"{type(exc).__name__}: {exc}")

    def _count_malformed(self, topic: str, error: str) -> None:
        self.malformed += 1
        log.warning("agent.malformed topic=%s error=%r malformed=%d", topic, error, self.malformed)

    def _on_chunk(self, chunk: wire.Chunk) -> None:
        with self._lock:
            job = self._job
        if job is not None:
            job.feed(chunk)

    def _on_desired_payload(self, message: Inbound) -> None:
        self.heard_from_plane.set()
        if not message.payload:
            log.info("agent.desired_cleared")  # the plane removed its retained message
            return
        _, _, desired = wire.decode_from(message.topic, message.payload)
        assert isinstance(desired, wire.Desired)
        self.on_desired(desired)

    def on_desired(self, desired: wire.Desired) -> None:
        if desired.deployment_id is None:
            log.info("agent.desired_none")
            self._cancel_job()
            return
        with self._lock:
            job = self._job
            if job is not None and job.running and job.deployment_id == desired.deployment_id:
                return  # the same deployment again, e.g. redelivered on reconnect
            if self.active is not None and self.active.runs_same_model(desired):
                if job is not None:
                    job.cancel()  # the plane wants back what already runs: stop fetching anything else
                self._confirm_active(desired)
                return
            self._start_job(desired)

    def _cancel_job(self) -> None:
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel()

    def _confirm_active(self, desired: wire.Desired) -> None:
        assert self.active is not None and desired.deployment_id is not None
        if desired.deployment_id != self.active.deployment_id:
            self._relabel(desired)
        log.info("agent.already_active deployment_id=%d", desired.deployment_id)
        self.report(desired.deployment_id, "active", sha256=self.active.sha256)

    def _relabel(self, desired: wire.Desired) -> None:
        assert self.active is not None and desired.deployment_id is not None
        active = msgspec.structs.replace(
            self.active, deployment_id=desired.deployment_id, model=desired.model, version=desired.version
        )
        self.runner.relabel(active.info)
        save_active(self.data_dir, active)
        self.active = active

    def _start_job(self, desired: wire.Desired) -> None:
        previous = self._job
        if previous is not None:
            previous.cancel()
        self._job = DeploymentJob(
            desired,
            data_dir=self.data_dir,
            settings=self.config.transfer,
            clock=self.clock,
            runner=self.runner,
            report=self.report,
            request_chunks=self._request_chunks,
            on_active=self._set_active,
            after=previous,
        )
        log.info(
            "agent.deploying deployment_id=%s model=%r version=%r",
            desired.deployment_id,
            desired.model,
            desired.version,
        )
        self._job.start()

    def _set_active(self, active: ActiveDeployment) -> None:
        with self._lock:
            self.active = active

    # --- outbound -------------------------------------------------------------------

    def report(
        self,
        deployment_id: int,
        state: wire.DeploymentStateName,
        *,
        sha256: str | None = None,
        error: str = "",
        bytes_done: int = 0,
        bytes_total: int = 0,
    ) -> None:
        report = wire.StateReport(
            device_id=self.device_id,
            deployment_id=deployment_id,
            state=state,
            sha256=sha256,
            error=error,
            bytes_done=bytes_done,
            bytes_total=bytes_total,
            sent_at=self.clock.time(),
        )
        log.info("agent.state deployment_id=%d state=%s bytes=%d/%d", deployment_id, state, bytes_done, bytes_total)
        self._publish(wire.Channel.STATE, report)

    def _request_chunks(self, deployment_id: int, sha256: str, indexes: list[int]) -> None:
        request = wire.ChunkRequest(
            device_id=self.device_id, deployment_id=deployment_id, sha256=sha256, indexes=indexes
        )
        self._publish(wire.Channel.CHUNK_REQUEST, request)

    def _beat(self) -> None:
        interval = self.config.heartbeat_interval
        wait = min(interval, FIRST_HEARTBEAT_MAX_S)
        while not self._stopping.wait(wait):
            self.send_heartbeat()
            wait = interval

    def _greet(self) -> None:
        """Repeat hello, backing off, until the plane answers with this device's desired state.

        The plane answers every device it knows with a retained desired message, so
        silence means it has not registered us: its bridge was down or not yet
        subscribed when we said hello.
        """
        first, most = self.hello_retry
        delay = first
        while not self._stopping.wait(delay):
            if self.heard_from_plane.is_set() or not self.mqtt.connected:
                delay = first
                continue
            log.info("agent.hello_again no answer from the plane yet; next try in %.0fs", min(delay * 2, most))
            self._publish(wire.Channel.HELLO, self._hello())
            delay = min(delay * 2, most)

    def send_heartbeat(self) -> None:
        if not self.mqtt.connected:
            return  # a heartbeat is about now; queueing it for later would only mislead
        heartbeat = self.heartbeats.build(self.config.heartbeat_interval, self._active_model())
        self._publish(wire.Channel.HEARTBEAT, heartbeat)
