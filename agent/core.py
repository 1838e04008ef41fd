"""The agent: wires the broker link, the runner, the deployment jobs, heartbeats and local HTTP.

Built from what it is given (``Agent(config, mqtt, runner, clock)``) and connects
nothing until ``start``. paho's thread only queues messages; the agent's own
pump thread decodes and routes them, and one bad message is logged and counted,
never fatal.

It owns the two model slots (agent.slots): a deployment job hands it a loaded,
self-tested model, the agent makes it current and watches its probation, and
rolls back to the previous slot on its own when the model fails or keeps
killing the agent at start-up. Heartbeats and state reports go through the
on-disk outbox (agent.outbox), so none is lost while the broker is away.
"""

from __future__ import annotations

import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Final, NamedTuple

import msgspec

from agent import admission, outbox, status, trust
from agent.active import ActiveDeployment
from agent.bundles import load_deployment, prune_bundles
from agent.clock import Clock
from agent.config import Config
from agent.contract import signing, wire
from agent.deployment import DeploymentJob
from agent.files import write_atomic
from agent.hardware import detect_profile
from agent.metrics import AgentMetrics, MetricsServer, Sample
from agent.mqtt import Inbound, Link, LinkError
from agent.runtime import Loaded, ModelLoadError, Runner
from agent.server import InferenceServer
from agent.slots import Slots, load_slots, save_slots
from agent.telemetry import GenerationRecorder, HeartbeatBuilder, LatencyRecorder
from agent.transfer import prune

log = logging.getLogger(__name__)

FIRST_HEARTBEAT_MAX_S: Final = 2.0
# A hello sent while no bridge listened is lost; say it again until the plane answers.
HELLO_RETRY_S: Final = (5.0, 300.0)
PUMP_POLL_S: Final = 0.2
JOIN_TIMEOUT_S: Final = 5.0
PROBATION_POLL_S: Final = 0.2
STATUS_EVERY_S: Final = 1.0


class Probation(NamedTuple):
    """When the current slot's probation began, and the request counters then."""

    started: float
    requests: int
    faults: int


class Agent:
    """One device's agent. ``start`` it, then ``stop`` it; both are safe to call from any thread."""

    def __init__(self, config: Config, mqtt: Link, runner: Runner, clock: Clock) -> None:
        self.config = config
        self.mqtt = mqtt
        self.runner = runner
        self.clock = clock
        self.device_id = config.device_id
        self.data_dir = config.data_path
        # Recorded always, served only with [metrics] enabled; a generative runtime records here too.
        self.metrics = AgentMetrics()
        self.metrics_server: MetricsServer | None = None
        self.recorder = LatencyRecorder(self.metrics)
        self.generations = GenerationRecorder()
        self.heartbeats = HeartbeatBuilder(self.device_id, clock, self.recorder, self.generations)
        self.malformed = 0
        self.server: InferenceServer | None = None
        self.active: ActiveDeployment | None = None
        self.slots = Slots()
        self.probation: Probation | None = None
        self.outbox = outbox.Outbox(
            self.data_dir / outbox.FILENAME,
            mqtt,
            max_queued=config.telemetry.max_queued,
            window=config.telemetry.window,
        )
        self.measure: admission.Measure = admission.measure  # what the device has free; tests replace it
        key = config.security.plane_public_key
        self.plane_key = signing.load_public_key(key) if key else None
        self.trust = trust.DesiredTrust(
            self.data_dir, self.device_id, self.plane_key, allow_unsigned=config.security.allow_unsigned
        )
        self.refused = 0
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
        self.outbox.open()
        self._restore_slots()
        self._start_server()
        self._start_metrics()
        self.mqtt.on_connected = self._on_connected
        self.mqtt.connect()
        self.outbox.start()
        self._spawn(self._pump, "agent-pump")
        self._spawn(self._beat, "agent-heartbeat")
        self._spawn(self._greet, "agent-hello")
        self._spawn(self._watch, "agent-probation")
        self._spawn(self._write_status, "agent-status")
        log.info("agent.started device_id=%s data_dir=%s", self.device_id, self.data_dir)
        if self.plane_key is None and self.config.security.allow_unsigned:
            log.warning(
                "agent.UNVERIFIED_DEPLOYMENTS security.allow_unsigned is true and no plane_public_key is set: "
                "this agent runs whatever desired message and model files reach its topic, unchecked. "
                "Development only: set plane_public_key (GET /api/v1/signing-key/) and remove allow_unsigned."
            )
        elif self.plane_key is None:
            log.error("agent.no_plane_key %s", trust.NO_KEY)

    def stop(self, reason: str = "shutdown") -> None:
        """Say goodbye, disconnect cleanly (so the broker drops the last-will) and stop serving."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        with self._lock:
            job = self._job
        if job is not None:
            job.cancel()
        self._stopped_cleanly()
        self.outbox.stop()
        goodbye = wire.Presence(device_id=self.device_id, online=False, reason=reason)
        self.mqtt.close(farewell=Inbound(self.topic(wire.Channel.PRESENCE), wire.encode(goodbye)))
        if self.server is not None:
            self.server.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
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
        self.server = InferenceServer(
            self.runner,
            self.recorder,
            host=http.host,
            port=http.port,
            generations=self.generations,
            timeout=http.timeout,
            max_connections=http.max_connections,
            generation=self.config.generation,
        )
        self.server.start()
        # With port 0 the kernel picks; whoever starts us reads the real one here.
        write_atomic(self.data_dir / "http.port", f"{self.server.port}\n".encode())

    def _start_metrics(self) -> None:
        settings = self.config.metrics
        if not settings.enabled:
            return
        self.metrics_server = MetricsServer(self.metrics, self.metric_samples, host=settings.host, port=settings.port)
        self.metrics_server.start()
        write_atomic(self.data_dir / "metrics.port", f"{self.metrics_server.port}\n".encode())

    def metric_samples(self) -> list[Sample]:
        """The gauges /metrics reads at each scrape: the download under way, the outbox, the link."""
        with self._lock:
            job = self._job
        running = job is not None and job.running
        return [
            Sample("edgefleet_download_received_bytes", "gauge", "Bytes of the current download on disk (0: none).",
                   job.bytes_done if job is not None and running else 0),
            Sample("edgefleet_download_size_bytes", "gauge", "Size of the current download (0: none).",
                   job.bytes_total if job is not None and running else 0),
            Sample("edgefleet_outbox_messages", "gauge", "Heartbeats and reports queued for the broker.",
                   self.outbox.depth),
            Sample("edgefleet_outbox_dropped_total", "counter", "Queued heartbeats dropped: the outbox was full.",
                   self.outbox.dropped),
            Sample("edgefleet_broker_connected", "gauge", "1 while the agent holds its broker connection.",
                   int(self.mqtt.connected)),
        ]  # fmt: skip

    # --- slots ------------------------------------------------------------------

    def _restore_slots(self) -> None:
        """Load the model this device ran before it restarted, from disk alone; leave a crash loop."""
        slots = load_slots(self.data_dir)
        if slots.active is not None and not slots.healthy:
            slots = msgspec.structs.replace(slots, starts=slots.starts + 1)
            save_slots(self.data_dir, slots)  # before loading: if the load kills us, the start still counts
        with self._lock:
            self.slots = slots
            crashes = slots.starts - 1
            looping = not slots.healthy and crashes >= self.config.activation.max_crashes
            if looping and self._roll_back(
                f"the agent died {crashes} times with this version before it passed its "
                f"{self.config.activation.probation:g}s probation (crash loop)"
            ):
                return
            if slots.active is not None:
                self._restore_current(slots.active)

    def _restore_current(self, active: ActiveDeployment) -> None:
        try:
            self.runner.install(self._load_stored(active))
        except (ModelLoadError, FileNotFoundError) as exc:
            log.error("agent.restore_failed deployment_id=%d error=%r", active.deployment_id, str(exc))
            if not self.slots.healthy:
                self._roll_back(f"cannot load it at start-up: {exc}")
            return
        self.active = active
        if not self.slots.healthy:
            self._begin_probation()
        log.info("agent.restored deployment_id=%d sha256=%s", active.deployment_id, active.sha256[:12])

    def _load_stored(self, active: ActiveDeployment) -> Loaded:
        return load_deployment(self.data_dir, active, self.config.generation)

    def _activate(self, loaded: Loaded, active: ActiveDeployment) -> None:
        """Called by a deployment job with a model that passed its self-test: swap it in, start probation."""
        with self._lock:
            self.runner.install(loaded)  # one reference swap: requests in flight finish on the old model
            withdrawn = self.active if self.slots.moves_back(active) else None
            if withdrawn is not None:
                # A plane rollback: the version left is no fallback, so neither probation nor a crash
                # loop can take the device back to it (issue #13, item 15). Nothing to fall back to,
                # so no probation either: the version it goes back to already ran here.
                self.slots = self.slots.switched_back(active)
                self.probation = None
                log.info(
                    "agent.moved_back deployment_id=%d withdrawn_deployment_id=%d: no fallback to the withdrawn one",
                    active.deployment_id,
                    withdrawn.deployment_id,
                )
            else:
                self.slots = self.slots.activated(active)
                self._begin_probation()
            save_slots(self.data_dir, self.slots)
            self.active = active
            self._prune()

    def _prune(self) -> None:
        """Free the disk of versions neither slot holds. Caller holds ``_lock``, so no job starts meanwhile."""
        keep: set[str] = set()
        slots = [slot for slot in (self.slots.a, self.slots.b) if slot is not None]
        for slot in slots:
            keep.update(slot.hashes)
        if self._job is not None:
            keep.update(f.sha256 for f in self._job.desired.files)
        prune(self.data_dir, keep)
        prune_bundles(self.data_dir, [slot.files for slot in slots])

    def _begin_probation(self) -> None:
        self.probation = Probation(self.clock.monotonic(), *self.recorder.totals())

    def _watch(self) -> None:
        while not self._stopping.wait(PROBATION_POLL_S):
            self.check_probation()

    def check_probation(self) -> None:
        """Roll back if the current model fails too often; mark it healthy once its probation is over."""
        rules = self.config.activation
        with self._lock:
            probation = self.probation
            if probation is None:
                return
            total, faulted = self.recorder.totals()
            requests, faults = total - probation.requests, faulted - probation.faults
            if requests >= rules.min_requests and faults >= requests * rules.max_error_rate:
                self._roll_back(
                    f"{faults} of {requests} local inferences failed within probation "
                    f"({faults / requests:.0%}; the limit is {rules.max_error_rate:.0%})"
                )
            elif self.clock.monotonic() - probation.started >= rules.probation:
                self._pass_probation()

    def _pass_probation(self) -> None:
        self.probation = None
        self.slots = msgspec.structs.replace(self.slots, healthy=True, starts=0)
        save_slots(self.data_dir, self.slots)
        active = self.slots.active
        log.info("agent.healthy deployment_id=%s", active.deployment_id if active else None)

    def _roll_back(self, reason: str) -> bool:
        """Go back to the previous slot; False if there is none to go to. Caller holds ``_lock``."""
        self.probation = None
        bad, previous = self.slots.active, self.slots.previous
        assert bad is not None
        if previous is None:
            log.error("agent.cannot_roll_back deployment_id=%d reason=%r no previous model", bad.deployment_id, reason)
            return False
        try:
            self.runner.install(self._load_stored(previous))
        except (ModelLoadError, FileNotFoundError) as exc:
            log.error("agent.cannot_roll_back deployment_id=%d error=%r", bad.deployment_id, str(exc))
            return False
        self.slots = self.slots.rolled_back()
        save_slots(self.data_dir, self.slots)
        self.active = previous
        log.warning(
            "agent.rolled_back deployment_id=%d to_deployment_id=%d reason=%r",
            bad.deployment_id,
            previous.deployment_id,
            reason,
        )
        self.report(bad.deployment_id, "rolled_back", sha256=bad.sha256, error=reason)
        return True

    def _stopped_cleanly(self) -> None:
        # A clean stop during probation is no crash: take back the start it counted.
        with self._lock:
            if self.slots.active is None or self.slots.healthy or self.slots.starts <= 0:
                return
            self.slots = msgspec.structs.replace(self.slots, starts=self.slots.starts - 1)
            save_slots(self.data_dir, self.slots)

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
        if not self._trusted(desired):
            return
        if desired.deployment_id is None:
            log.info("agent.desired_none")
            self._cancel_job()
            return
        with self._lock:
            job = self._job
            if job is not None and job.running and job.deployment_id == desired.deployment_id:
                return  # the same deployment again, e.g. redelivered on reconnect
            if desired.deployment_id in self.slots.rejected:
                self._refuse_rejected(desired)
                return
            if self.active is not None and self.active.runs_same_model(desired):
                if job is not None:
                    job.cancel()  # the plane wants back what already runs: stop fetching anything else
                self._confirm_active(desired)
                return
            self._start_job(desired)

    def _trusted(self, desired: wire.Desired) -> bool:
        """Verify the plane's signature and that the message is not older than one acted on; record it."""
        try:
            self.trust.check(desired)
        except trust.Stale as exc:
            self.refused += 1
            log.warning("agent.desired_stale error=%r refused=%d", str(exc), self.refused)
            return False
        except ValueError as exc:  # trust.Refused, signing.SignatureError
            self.refused += 1
            log.error("agent.desired_refused deployment_id=%s error=%r", desired.deployment_id, str(exc))
            if desired.deployment_id is not None:
                self.report(desired.deployment_id, "failed", error=str(exc)[:2000])
            return False
        self.trust.accept(desired)
        return True

    def _refuse_rejected(self, desired: wire.Desired) -> None:
        assert desired.deployment_id is not None
        log.info("agent.still_rolled_back deployment_id=%d", desired.deployment_id)
        files = {f.role: f.sha256 for f in desired.files}
        self.report(
            desired.deployment_id,
            "rolled_back",
            sha256=files.get("model"),
            error="this device rolled the deployment back earlier and will not take it again",
        )

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
        self.slots = self.slots.relabelled(active)
        save_slots(self.data_dir, self.slots)
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
            report=self.report,
            request_chunks=self._request_chunks,
            activate=self._activate,
            rules=self.config.admission,
            measure=self.measure,
            after=previous,
            plane_key=self.plane_key,
            generation=self.config.generation,
        )
        log.info(
            "agent.deploying deployment_id=%s model=%r version=%r",
            desired.deployment_id,
            desired.model,
            desired.version,
        )
        self._job.start()

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
        self._enqueue(wire.Channel.STATE, report)

    def _enqueue(self, channel: wire.Channel, message: wire.Message) -> None:
        try:
            self.outbox.put(channel, self.topic(channel), wire.encode(message))
        except (LinkError, sqlite3.Error) as exc:
            log.error("agent.enqueue_failed channel=%s error=%r", channel, str(exc))

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
        # Queued even while offline: each carries its own sent_at, and the plane wants the gap filled.
        heartbeat = self.heartbeats.build(self.config.heartbeat_interval, self._active_model(), self.outbox.dropped)
        self._enqueue(wire.Channel.HEARTBEAT, heartbeat)

    # --- status -----------------------------------------------------------------------

    def status(self) -> status.Status:
        with self._lock:
            job, slots, probation = self._job, self.slots, self.probation
        left = None
        if probation is not None:
            left = max(0.0, self.config.activation.probation - (self.clock.monotonic() - probation.started))
        return status.Status(
            device_id=self.device_id,
            pid=os.getpid(),
            updated_at=time.time(),  # the host's clock, as the status command reads it; not a fleet timestamp
            connected=self.mqtt.connected,
            http_port=self.server.port if self.server else None,
            current=status.slot_info(slots.current, slots.active),
            previous=status.slot_info(slots.idle, slots.previous),
            healthy=slots.healthy,
            probation_left_s=left,
            download=status.download_info(job) if job is not None and job.running else None,
            outbox_depth=self.outbox.depth,
            outbox_dropped=self.outbox.dropped,
        )

    def _write_status(self) -> None:
        while True:
            try:
                status.save(self.data_dir, self.status())
            except OSError as exc:
                log.warning("agent.status_failed error=%r", str(exc))
            if self._stopping.wait(STATUS_EVERY_S):
                return
