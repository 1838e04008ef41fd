"""A fleet simulator: thousands of devices speaking the real protocol to the real broker.

    python -m bench.simulate --devices 2000 --heartbeat-interval 30 --duration 300

Each simulated device is a paho client (driven by one selector per process, see
bench.loop) that does what an agent does on the wire (agent/contract/wire.py):

- says hello on every (re)connect, with a hardware profile drawn from ``--hardware-mix``;
- subscribes to its retained ``desired`` and heartbeats every ``--heartbeat-interval``;
- on a new desired deployment reports ``downloading`` then, after ``--activate-delay``,
  ``active`` with the model's sha256. It fetches no chunks: a simulated device's
  cache already holds every file, so only the control traffic is exercised;
- sets the same last-will as the agent, so a dropped connection reads as ``lost``.

Failure injection: ``--fail-activate`` is the fraction of devices that report
``failed`` instead of ``active``; ``--regress`` the fraction whose latency triples
once they run a new deployment; ``--flaky`` the fraction of devices that drop their
connection each minute (abruptly, without DISCONNECT) and reconnect a few seconds later.

Logging in: with ``--state-dir`` every device logs in to the broker with a login of its
own, as an agent does on a broker with dynamic security (docs/security.md). Each device
keeps an agent's state in a directory of its own (``device.key``, ``broker.json``); a
device without a saved login enrolls with the plane at ``--plane`` using
``--enroll-token`` through agent/enrollment.py, the agent's own code, before the fleet
connects. A restarted simulator reuses the saved logins, as a restarted agent does.

It stops by itself after ``--duration`` seconds, and talks only to a broker on
loopback unless ``--allow-remote`` is given. docs/simulator.md tells how to size a
deployment with it.
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import json
import multiprocessing
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt

from agent import enrollment
from agent.contract import wire
from bench.loop import ClientLoop

PROFILES: dict[str, dict] = {
    "linux-x86_64": dict(
        arch="x86_64",
        os="linux",
        cpu_count=4,
        ram_bytes=8 << 30,
        base_ms=6.0,
        cpu_flags=["sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni"],
    ),
    "linux-aarch64": dict(
        arch="aarch64", os="linux", cpu_count=4, ram_bytes=4 << 30, base_ms=14.0, cpu_flags=["fp", "asimd", "asimddp"]
    ),
    "darwin-arm64": dict(
        arch="arm64", os="darwin", cpu_count=8, ram_bytes=16 << 30, base_ms=4.0, cpu_flags=["asimd", "asimddp"]
    ),
}
MAX_DURATION_S = 24 * 3600
RECONNECT_AFTER_S = (1.0, 5.0)


@dataclass
class Options:
    broker_url: str = "mqtt://127.0.0.1:1883"
    devices: int = 100
    prefix: str = "sim"
    first: int = 0
    heartbeat_interval: float = 30.0
    hardware_mix: dict[str, float] = field(default_factory=lambda: {"linux-x86_64": 1.0})
    fail_activate: float = 0.0
    regress: float = 0.0
    flaky: float = 0.0
    activate_delay: float = 0.0
    connect_rate: float = 1000.0
    duration: float = 60.0
    qos: int = 1
    seed: int = 1
    allow_remote: bool = False
    # Logging in as agents do: a data directory a device under state_dir, and the plane to
    # enroll with (its URL and an enrollment token) for a device that has no saved login.
    state_dir: str = ""
    plane_url: str = ""
    enroll_token: str = ""
    enroll_threads: int = 8


@dataclass
class Totals:
    """What a run did, summed over its processes."""

    connected: int = 0
    connects: int = 0
    # Connection attempts the broker answered with a refusal (a bad or unknown login).
    refused: int = 0
    disconnects: int = 0
    hellos: int = 0
    heartbeats: int = 0
    heartbeats_acked: int = 0
    desired: int = 0
    states: dict[str, int] = field(default_factory=dict)
    dropped_on_purpose: int = 0
    elapsed_s: float = 0.0

    def add(self, other: Totals) -> None:
        counts = ("connected", "connects", "refused", "disconnects", "hellos", "heartbeats", "heartbeats_acked")
        for name in (*counts, "desired"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.dropped_on_purpose += other.dropped_on_purpose
        for state, n in other.states.items():
            self.states[state] = self.states.get(state, 0) + n
        self.elapsed_s = max(self.elapsed_s, other.elapsed_s)


class SimDevice:
    """One simulated device: its paho client and what it would report."""

    def __init__(
        self, fleet: Fleet, device_id: str, broker: wire.BrokerUrl, hw_class: str, *, fails: bool, regresses: bool
    ) -> None:
        self.fleet = fleet
        self.device_id = device_id
        self.broker = broker
        self.hw_class = hw_class
        self.fails = fails
        self.regresses = regresses
        self.seq = 0
        self.started = time.time()
        self.active: wire.ActiveModel | None = None
        self.deployment_id: int | None = None
        self.regressed = False
        self.topics = {channel: wire.topic(device_id, channel) for channel in wire.Channel}
        self.client = self._client()

    def _client(self) -> mqtt.Client:
        broker = self.broker
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"{self.device_id}",
            protocol=mqtt.MQTTv5 if broker.mqtt_v5 else mqtt.MQTTv311,
        )
        lost = wire.encode(wire.Presence(device_id=self.device_id, online=False, reason="lost"))
        client.will_set(self.topics[wire.Channel.PRESENCE], lost, qos=1)
        if broker.username:
            client.username_pw_set(broker.username, broker.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return self.fleet.loop.add(client)

    def connect(self) -> None:
        broker = self.broker
        try:
            if self.client.host:
                self.client.reconnect()
            else:
                self.client.connect(broker.host, broker.port, keepalive=60)
        except OSError:
            self.fleet.schedule_reconnect(self)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.fleet.totals.refused += 1
            return
        totals = self.fleet.totals
        totals.connects += 1
        totals.connected += 1
        client.subscribe(self.topics[wire.Channel.DESIRED], qos=1)
        self.publish(wire.Channel.HELLO, self.hello())
        totals.hellos += 1

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.fleet.totals.connected -= 1
        self.fleet.totals.disconnects += 1
        if not self.fleet.stopping:
            self.fleet.schedule_reconnect(self)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.fleet.acked += 1

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        try:
            desired = wire.decode(wire.Channel.DESIRED, message.payload)
        except wire.WireError:
            return
        self.fleet.totals.desired += 1
        assert isinstance(desired, wire.Desired)
        if desired.deployment_id is None or desired.deployment_id == self.deployment_id:
            return
        self.deployment_id = desired.deployment_id
        model = next((f for f in desired.files if f.role == "model"), None)
        self.report(desired.deployment_id, "downloading", bytes_total=model.size if model else 0)
        self.fleet.later(self.fleet.options.activate_delay, lambda: self.finish(desired.deployment_id, model))

    def finish(self, deployment_id: int, model: wire.FileManifest | None) -> None:
        if deployment_id != self.deployment_id or model is None:
            return
        if self.fails:
            self.report(deployment_id, "failed", error="simulated: the model failed to load")
            return
        self.active = wire.ActiveModel(deployment_id=deployment_id, sha256=model.sha256)
        self.regressed = self.regresses
        self.report(deployment_id, "active", sha256=model.sha256, bytes_done=model.size, bytes_total=model.size)

    def report(self, deployment_id: int, state: str, **fields) -> None:
        report = wire.StateReport(
            device_id=self.device_id, deployment_id=deployment_id, state=state, sent_at=time.time(), **fields
        )
        self.publish(wire.Channel.STATE, report)
        self.fleet.totals.states[state] = self.fleet.totals.states.get(state, 0) + 1

    def hello(self) -> wire.Hello:
        profile = PROFILES[self.hw_class]
        hardware = wire.HardwareProfile(
            arch=profile["arch"],
            os=profile["os"],
            cpu_model=f"simulated {self.hw_class}",
            cpu_count=profile["cpu_count"],
            cpu_flags=profile["cpu_flags"],
            ram_bytes=profile["ram_bytes"],
            disk_free_bytes=32 << 30,
            providers=["CPUExecutionProvider"],
            agent_version="sim",
        )
        return wire.Hello(device_id=self.device_id, name=self.device_id, hardware=hardware, active=self.active,
                          sent_at=time.time())  # fmt: skip

    def heartbeat(self) -> wire.Heartbeat:
        self.seq += 1
        base = PROFILES[self.hw_class]["base_ms"] * (3.0 if self.regressed else 1.0)
        jitter = self.fleet.random.random()
        now = time.time()
        return wire.Heartbeat(
            device_id=self.device_id,
            seq=self.seq,
            sent_at=now,
            interval_s=self.fleet.options.heartbeat_interval,
            uptime_s=now - self.started,
            cpu_percent=5.0 + 10 * jitter,
            mem_rss_bytes=120 << 20,
            mem_available_bytes=2 << 30,
            active=self.active,
            requests=20,
            errors=0,
            latency=wire.LatencyStats(
                count=20, p50_ms=base, p95_ms=base * 1.6, p99_ms=base * 2.0, max_ms=base * (2.2 + jitter)
            ),
        )

    def publish(self, channel: wire.Channel, message: wire.Message) -> None:
        self.client.publish(self.topics[channel], wire.encode(message), qos=self.fleet.options.qos)

    def beat(self) -> None:
        if self.client.is_connected():
            self.publish(wire.Channel.HEARTBEAT, self.heartbeat())
            self.fleet.totals.heartbeats += 1

    def drop(self) -> None:
        """Lose the connection without a goodbye, as a flaky link does: the broker sends the will."""
        sock = self.client.socket()
        if sock is not None and self.client.is_connected():
            self.fleet.totals.dropped_on_purpose += 1
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class Fleet:
    """The devices of one process, with a timer heap for heartbeats, activations and reconnects."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.broker = wire.parse_broker_url(options.broker_url)
        check_broker_host(self.broker.host, allow_remote=options.allow_remote)
        self.random = random.Random(options.seed + options.first)
        self.loop = ClientLoop()
        self.totals = Totals()
        self.acked = 0
        self.stopping = False
        self._timers: list[tuple[float, int, object]] = []
        self._order = 0
        ids = device_ids(options)
        logins = {d: login for d, (login, _) in log_in(options, ids).items()} if options.state_dir else {}
        self.devices = [self._make(device_id, logins.get(device_id, self.broker)) for device_id in ids]

    def _make(self, device_id: str, broker: wire.BrokerUrl) -> SimDevice:
        classes, weights = zip(*self.options.hardware_mix.items(), strict=True)
        hw_class = self.random.choices(classes, weights)[0]
        fails = self.random.random() < self.options.fail_activate
        regresses = self.random.random() < self.options.regress
        return SimDevice(self, device_id, broker, hw_class, fails=fails, regresses=regresses)

    def later(self, delay: float, action) -> None:
        self._order += 1
        heapq.heappush(self._timers, (time.monotonic() + delay, self._order, action))

    def schedule_reconnect(self, device: SimDevice) -> None:
        self.later(self.random.uniform(*RECONNECT_AFTER_S), device.connect)

    def _every(self, device: SimDevice) -> None:
        device.beat()
        self.later(self.options.heartbeat_interval, lambda: self._every(device))

    def _fire_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            try:
                action()
            except OSError:
                pass

    def run(self) -> Totals:
        """Connect at ``connect_rate``, heartbeat, react to desired; stop after ``duration``."""
        options = self.options
        started = time.monotonic()
        deadline = started + min(options.duration, MAX_DURATION_S)
        for n, device in enumerate(self.devices):
            self.later(n / options.connect_rate, device.connect)
            # Spread the first heartbeats over one interval, as a fleet that booted at different times.
            first = n / options.connect_rate + self.random.uniform(0, options.heartbeat_interval)
            self.later(first, lambda d=device: self._every(d))
        flaky_check = started + 60.0
        while time.monotonic() < deadline:
            self.loop.run_once(0.005 if self._timers else 0.05)
            self._fire_timers()
            if options.flaky and time.monotonic() >= flaky_check:
                flaky_check += 60.0
                for device in self.random.sample(self.devices, int(len(self.devices) * options.flaky)):
                    device.drop()
        self.stopping = True
        self.totals.heartbeats_acked = self.acked
        self.totals.elapsed_s = time.monotonic() - started
        self.loop.close()
        return self.totals


def device_ids(options: Options) -> list[str]:
    return [f"{options.prefix}-{n:06d}" for n in range(options.first, options.first + options.devices)]


def _login(options: Options, device_id: str, stop: threading.Event) -> wire.BrokerUrl:
    """The device's broker login, as its agent gets it: saved in its data directory, or enrolled now."""
    if not options.plane_url:
        raise SystemExit("--state-dir needs --plane: the plane to enroll with, for a device that has no login yet")
    data_path = Path(options.state_dir) / device_id
    data_path.mkdir(parents=True, exist_ok=True)
    credentials = enrollment.enroll(plane_url=options.plane_url, token=options.enroll_token, device_id=device_id,
                                    name=device_id, data_path=data_path, stop=stop, poll_interval=1.0)  # fmt: skip
    if credentials is None:
        raise enrollment.EnrollmentError(f"{device_id}: stopped before the plane accepted it")
    broker = wire.parse_broker_url(options.broker_url)
    return enrollment.broker_with(broker, credentials, allowed_hosts={broker.host}, allow_insecure=options.allow_remote)


def log_in(options: Options, ids: list[str]) -> dict[str, tuple[wire.BrokerUrl, float]]:
    """Each device's login and the seconds it took to get; ``enroll_threads`` devices at a time."""
    stop = threading.Event()

    def one(device_id: str) -> tuple[str, tuple[wire.BrokerUrl, float]]:
        started = time.monotonic()
        broker = _login(options, device_id, stop)
        return device_id, (broker, time.monotonic() - started)

    pool = ThreadPoolExecutor(max(1, options.enroll_threads))
    try:
        return dict(pool.map(one, ids))
    finally:
        stop.set()  # a device still pending stops asking
        pool.shutdown(cancel_futures=True)


def check_broker_host(host: str, *, allow_remote: bool) -> None:
    """Load goes to loopback only, unless the operator says the broker is theirs to load."""
    if allow_remote:
        return
    try:
        loopback = all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to load {host}: it is not loopback (pass --allow-remote for a broker you own)")


def _run_part(options: Options, results) -> None:
    results.put(asdict(Fleet(options).run()))


def simulate(options: Options, *, processes: int = 1) -> Totals:
    """Run the fleet, split over ``processes`` processes; return what it did."""
    if processes <= 1:
        return Fleet(options).run()
    if options.state_dir:
        log_in(options, device_ids(options))  # enroll once, before forking: the parts read the saved logins
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    per = -(-options.devices // processes)
    parts = []
    for p in range(processes):
        count = min(per, options.devices - p * per)
        if count <= 0:
            break
        part = Options(**{**asdict(options), "devices": count, "first": options.first + p * per,
                          "connect_rate": options.connect_rate / processes})  # fmt: skip
        parts.append(context.Process(target=_run_part, args=(part, results), daemon=True))
    for proc in parts:
        proc.start()
    totals = Totals()
    for _ in parts:
        totals.add(Totals(**results.get(timeout=options.duration + 120)))
    for proc in parts:
        proc.join(timeout=30)
    return totals


def parse_mix(text: str) -> dict[str, float]:
    mix = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name.strip() not in PROFILES:
            raise argparse.ArgumentTypeError(f"hardware class {name!r} is not one of {', '.join(PROFILES)}")
        mix[name.strip()] = float(weight or 1)
    return mix


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError("a fraction is between 0 and 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="broker URL, as MQTT_URL")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--prefix", default="sim", help="device ids are <prefix>-000000, <prefix>-000001, ...")
    parser.add_argument("--heartbeat-interval", type=float, default=30.0, help="seconds")
    parser.add_argument("--hardware-mix", type=parse_mix, default={"linux-x86_64": 1.0},
                        help="e.g. linux-x86_64=0.6,linux-aarch64=0.3,darwin-arm64=0.1")  # fmt: skip
    parser.add_argument("--fail-activate", type=fraction, default=0.0, help="fraction that report failed")
    parser.add_argument("--regress", type=fraction, default=0.0, help="fraction whose latency triples when updated")
    parser.add_argument("--flaky", type=fraction, default=0.0, help="fraction that drop their connection each minute")
    parser.add_argument("--activate-delay", type=float, default=0.0, help="seconds from downloading to active")
    parser.add_argument("--connect-rate", type=float, default=1000.0, help="new connections a second")
    parser.add_argument("--duration", type=float, default=60.0, help=f"seconds, at most {MAX_DURATION_S}")
    parser.add_argument("--qos", type=int, choices=(0, 1), default=1)
    parser.add_argument("--processes", type=int, default=1, help="split the devices over this many processes")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--allow-remote", action="store_true", help="allow a broker that is not on loopback")
    parser.add_argument("--state-dir", default="", help="log in as agents do: a data directory a device under this")
    parser.add_argument("--plane", default="", help="the plane's URL, to enroll devices that have no saved login")
    parser.add_argument("--enroll-token", default="", help="the enrollment token devices enroll with")
    parser.add_argument("--enroll-threads", type=int, default=8, help="enrollments in flight at once")
    args = parser.parse_args(argv)
    options = Options(
        broker_url=args.broker,
        devices=args.devices,
        prefix=args.prefix,
        heartbeat_interval=args.heartbeat_interval,
        hardware_mix=args.hardware_mix,
        fail_activate=args.fail_activate,
        regress=args.regress,
        flaky=args.flaky,
        activate_delay=args.activate_delay,
        connect_rate=args.connect_rate,
        duration=args.duration,
        qos=args.qos,
        seed=args.seed,
        allow_remote=args.allow_remote,
        state_dir=args.state_dir,
        plane_url=args.plane,
        enroll_token=args.enroll_token,
        enroll_threads=args.enroll_threads,
    )
    totals = simulate(options, processes=args.processes)
    json.dump(asdict(totals), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
