"""Connections held: N simulated devices heartbeating against one broker and one ``run_bridge``.

Twice, side by side: on the anonymous broker (docker/mosquitto/mosquitto.conf) and on the
secure one that production runs (docker/mosquitto/secure.conf: the dynamic-security plugin,
a login and a role a device, every device enrolled and accepted; bench/logins.py tells how
the fleet gets its logins). Each run has a broker of its own.

The figure is how many devices the plane holds (connected, heartbeating, every one of
their heartbeats stored) and the lag from the ``sent_at`` a device puts in a heartbeat
to the row being visible in PostgreSQL (a poller reads new rows every ``POLL_S``, so
the lag includes up to that much polling). The ceilings, in the same run:

- connections: how many bare MQTT connections (raw CONNECT, nothing else) the same
  broker accepted, opened at the simulator's connect rate before the run;
- lag: a bare paho subscriber on the same heartbeats (a plain, not shared,
  subscription beside the bridge's), lag from ``sent_at`` to its ``on_message``.

Only heartbeats sent in the measurement window count; it starts once every device has
said hello and the bridge has worked through the hellos (a connect storm queues
them), and lasts ``hold_seconds``, two or three heartbeat intervals. The time from the
first connect to that start is how long the plane took to settle after the connect storm.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import selectors
import socket
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

import paho.mqtt.client as mqtt

from bench import harness, logins
from bench.blaster import connect_packet
from bench.context import Context
from bench.loop import leave_no_time_wait
from bench.report import Figure, Section
from bench.simulate import Options, device_ids, log_in, simulate
from tests.support import free_port, wait_for_port

POLL_S = 0.2
STRAGGLERS_S = 5.0
DEVICES_PER_PROCESS = 5000


def bare_connections(port: int, count: int, rate: float, credentials: list[tuple[str, str]] | None = None) -> int:
    """Open ``count`` raw MQTT connections at ``rate`` a second; how many the broker accepted.

    On a secure broker each logs in with one of ``credentials``, in turn.
    """
    selector = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    accepted = 0
    started = time.monotonic()
    try:
        for n in range(count):
            while time.monotonic() < started + n / rate:
                accepted += _read_connacks(selector, 0.001)
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                leave_no_time_wait(sock)
                login = credentials[n % len(credentials)] if credentials else None
                sock.sendall(connect_packet(f"bench-bare-conn-{n}", login))
            except OSError:
                break
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
            socks.append(sock)
        deadline = time.monotonic() + 10
        while accepted < len(socks) and time.monotonic() < deadline:
            accepted += _read_connacks(selector, 0.05)
    finally:
        for sock in socks:
            sock.close()
        selector.close()
    return accepted


def _read_connacks(selector: selectors.BaseSelector, timeout: float) -> int:
    accepted = 0
    for key, _ in selector.select(timeout):
        sock = key.fileobj
        try:
            data = sock.recv(4)  # type: ignore[union-attr]
        except OSError:
            data = b""
        selector.unregister(sock)
        # CONNACK: 0x20, length 2, flags, return code 0 = accepted.
        accepted += int(len(data) == 4 and data[0] == 0x20 and data[3] == 0)
    return accepted


def _bare_subscriber(port: int, stop, seconds: float, results, login: tuple[str, str] | None) -> None:
    """(sent_at, lag) of every heartbeat received; and the broker's own count of connected clients."""
    from agent.contract import wire

    lags: list[tuple[float, float]] = []
    connected = [0]

    def on_message(client, userdata, message) -> None:
        now = time.time()
        if message.topic.startswith("$SYS/"):
            connected[0] = max(connected[0], int(message.payload or 0))
            return
        try:
            sent_at = wire.decode(wire.Channel.HEARTBEAT, message.payload).sent_at  # type: ignore[union-attr]
        except wire.WireError:
            return
        lags.append((sent_at, now - sent_at))

    def on_connect(client, *args) -> None:
        client.subscribe([("fleet/+/heartbeat", 1), ("$SYS/broker/clients/connected", 0)])

    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                         client_id=f"bench-hold-bare-{time.monotonic_ns()}")  # fmt: skip
    client.on_message = on_message
    client.on_connect = on_connect
    if login:
        client.username_pw_set(*login)
    client.connect("127.0.0.1", port)
    client.loop_start()
    stop.wait(seconds)
    client.disconnect()
    client.loop_stop()
    results.put((lags, connected[0]))


class RowPoller:
    """Reads the heartbeat rows committed since the last look, every POLL_S: (device, sent_at, lag)."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.rows: list[tuple[int, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psycopg

        last = 0
        with psycopg.connect(self.url, autocommit=True) as conn:
            last = conn.execute("SELECT coalesce(max(id), 0) FROM fleet_heartbeat").fetchone()[0]
            while not self._stop.is_set():
                found = conn.execute(
                    "SELECT id, device_id, extract(epoch FROM sent_at) FROM fleet_heartbeat WHERE id > %s ORDER BY id",
                    (last,),
                ).fetchall()
                now = time.time()
                for row_id, device_pk, sent_at in found:
                    self.rows.append((device_pk, float(sent_at), now - float(sent_at)))
                    last = row_id
                self._stop.wait(POLL_S)

    def __enter__(self) -> RowPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def _run_part(options: Options) -> None:
    simulate(options)


def start_fleet(options: Options) -> list[multiprocessing.process.BaseProcess]:
    """The devices of ``options``, DEVICES_PER_PROCESS a process; the caller terminates them when done."""
    parts = -(-options.devices // DEVICES_PER_PROCESS)
    per = -(-options.devices // parts)
    procs = []
    for p in range(parts):
        part = dataclasses.replace(options, devices=min(per, options.devices - p * per), first=options.first + p * per,
                                   connect_rate=options.connect_rate / parts, seed=p + 1)  # fmt: skip
        proc = multiprocessing.get_context("fork").Process(target=_run_part, args=(part,), daemon=True)
        proc.start()
        procs.append(proc)
    return procs


@dataclass
class Held:
    """What one run measured."""

    devices: int
    accepted: int = 0
    broker_connected: int = 0
    held: int = 0
    stored: int = 0
    seen_bare: int = 0
    lag: dict[str, float | None] = field(default_factory=dict)
    hellos_s: float = 0.0
    settled_s: float = 0.0


@dataclass
class Run:
    """One broker's side of the benchmark: where the devices connect and how the plane is set for it."""

    label: str
    port: int
    env: dict[str, str]
    fleet: Options
    # Logins of the bare connections and the bare subscriber; None on the anonymous broker.
    bare_logins: list[tuple[str, str]] | None = None
    subscriber_login: tuple[str, str] | None = None
    # Called once the bridge is up, before the fleet connects.
    before_fleet: Callable[[], None] | None = None


def measure(ctx: Context, run: Run) -> Held:
    """Bare connections, then the fleet against one bridge: devices held, lag to the database, settling."""
    sizes, n = ctx.sizes, run.fleet.devices
    # The bridge starts (seconds of Django here) while the bare connections are counted.
    bridge = start_bridge(ctx, run.label, run.env)
    try:
        result = Held(n, accepted=bare_connections(run.port, n, sizes.hold_connect_rate, run.bare_logins))
        ctx.log(f"hold ({run.label}): the broker accepted {result.accepted} of {n} bare connections")
        time.sleep(1.0)
        harness.wait_for_log(bridge, "bridge connecting")
        if run.before_fleet:
            run.before_fleet()
        register_s = 60 + n / 50
        total = n / sizes.hold_connect_rate + register_s + sizes.hold_seconds + STRAGGLERS_S + 5
        context = multiprocessing.get_context("fork")
        results, stop = context.Queue(), context.Event()
        bare = context.Process(target=_bare_subscriber, args=(run.port, stop, total, results, run.subscriber_login),
                               daemon=True)  # fmt: skip
        bare.start()
        started = time.monotonic()
        fleet = start_fleet(dataclasses.replace(run.fleet, duration=total))
        with RowPoller(ctx.database_url) as poller:
            wait_said_hello(run.fleet.prefix, n, timeout=register_s)
            result.hellos_s = time.monotonic() - started
            # The hellos of a connect storm queue in the bridge ahead of heartbeats: wait until it is through.
            _wait_caught_up(poller, timeout=register_s)
            result.settled_s = time.monotonic() - started
            window = (time.time(), time.time() + sizes.hold_seconds)
            time.sleep(sizes.hold_seconds)
            _wait_stored_past(poller, window[1] + 1.0, timeout=STRAGGLERS_S)
        stop.set()
        lags, result.broker_connected = results.get(timeout=30)
        bare.join(timeout=10)
        for proc in fleet:
            proc.terminate()
            proc.join(timeout=30)
    finally:
        bridge.stop()
    _count(result, run.fleet.prefix, poller.rows, lags, window)
    ctx.log(f"hold ({run.label}): hellos applied in {result.hellos_s:.0f} s, settled in {result.settled_s:.0f} s; "
            f"{result.held} devices heartbeating, {result.stored} stored of {result.seen_bare} seen bare; "
            f"p99 lag {result.lag['p99']} s (bare {result.lag['bare99']} s)")  # fmt: skip
    return result


def start_bridge(ctx: Context, label: str, env: dict[str, str]) -> harness.PlaneProcess:
    logs = ctx.workdir / f"hold-{label}"
    logs.mkdir(exist_ok=True)
    return harness.bridges(1, env, logs)[0]


def _count(result: Held, prefix: str, rows: list[tuple[int, float, float]], lags, window) -> None:
    from fleet.models import Device

    pks = set(Device.objects.filter(device_id__startswith=f"{prefix}-").values_list("pk", flat=True))
    in_window = [(pk, lag) for pk, sent_at, lag in rows if window[0] <= sent_at < window[1] and pk in pks]
    db_lags = [lag for _, lag in in_window]
    bare_lags = [lag for sent_at, lag in lags if window[0] <= sent_at < window[1]]
    result.held, result.stored, result.seen_bare = len({pk for pk, _ in in_window}), len(db_lags), len(bare_lags)
    result.lag = {"p50": percentile(db_lags, 50), "p99": percentile(db_lags, 99),
                  "bare50": percentile(bare_lags, 50), "bare99": percentile(bare_lags, 99)}  # fmt: skip


def wait_said_hello(prefix: str, count: int, timeout: float) -> None:
    """Until ``count`` devices of ``prefix`` have said hello and the bridge has applied it."""
    from fleet.models import Device

    deadline = time.monotonic() + timeout
    # Only a hello sets the agent version: an enrolled device has a row before it ever connects.
    while (n := Device.objects.filter(device_id__startswith=f"{prefix}-", agent_version="sim").count()) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {n} of {count} simulated devices said hello in {timeout:.0f} s")
        time.sleep(0.2)


def anonymous(ctx: Context) -> Held:
    sizes = ctx.sizes
    fleet = Options(broker_url=ctx.broker.url, devices=sizes.hold_devices, prefix="hold",
                    heartbeat_interval=sizes.hold_interval, connect_rate=sizes.hold_connect_rate)  # fmt: skip
    return measure(ctx, Run("anonymous", ctx.broker.port, ctx.env, fleet))


@dataclass
class Enrolled:
    """How the secure run's fleet got its logins."""

    earlier: int = 0
    live: list[float] = field(default_factory=list)


def secure(ctx: Context) -> tuple[Held, Enrolled]:
    """The same hold on a broker with dynamic security: every device enrolled, with a login of its own."""
    from fleet.mqtt.dynsec import device_username
    from fleet.services import enrollment

    sizes, enrolled = ctx.sizes, Enrolled()
    state_dir = ctx.workdir / "secure-devices"
    fleet = Options(devices=sizes.hold_devices, prefix="secure", heartbeat_interval=sizes.hold_interval,
                    connect_rate=sizes.hold_connect_rate, state_dir=str(state_dir))  # fmt: skip
    ids = device_ids(fleet)
    earlier = logins.new_devices(ids[: len(ids) - sizes.hold_enrolling])
    with logins.secure_broker(ctx.workdir / "secure-broker", {d.device_id: d.password for d in earlier}) as broker:
        env = {**ctx.env, **broker.plane_env()}
        # Devices with a saved login never ask the plane; those that enroll now ask a gunicorn at
        # plane_url. It starts (seconds of Django here) while the fleet enrolled earlier is written,
        # the broker is set up, the bridge starts and the bare connections are counted.
        port = free_port()
        fleet = dataclasses.replace(fleet, broker_url=broker.url, plane_url=f"http://127.0.0.1:{port}")
        web = web_server(ctx, env, port) if sizes.hold_enrolling else None
        try:
            token, secret = enrollment.create_token(name="bench-secure", expires_in=timedelta(hours=2),
                                                    actor="system", auto_approve=True)  # fmt: skip
            logins.enroll_earlier(token, earlier, state_dir, broker.url)
            enrolled.earlier = len(earlier)
            logins.setup_broker(broker)

            def enroll_the_rest() -> None:
                if web is None:
                    return
                wait_for_port(port, timeout=60)
                live = dataclasses.replace(fleet, devices=sizes.hold_enrolling, first=len(earlier), enroll_token=secret)
                enrolled.live = enroll_live(live)
                web.stop()
                ctx.log(f"hold (secure): {len(enrolled.live)} devices enrolled through the plane's API, "
                        f"p50 {percentile(enrolled.live, 50)} s each")  # fmt: skip

            bare_logins = [(device_username(d.device_id), d.password) for d in earlier] or None
            run = Run("secure", broker.port, env, fleet, bare_logins, (logins.ADMIN_LOGIN, broker.admin_password),
                      before_fleet=enroll_the_rest)  # fmt: skip
            return measure(ctx, run), enrolled
        finally:
            if web is not None:
                web.stop()


def web_server(ctx: Context, env: dict[str, str], port: int) -> harness.PlaneProcess:
    cmd = [sys.executable, "-m", "gunicorn", "controlplane.wsgi:application", "--bind", f"127.0.0.1:{port}",
           "--workers", "2", "--log-level", "warning"]  # fmt: skip
    # Enrollment is throttled per client address; every simulated device comes from 127.0.0.1.
    return harness.PlaneProcess("secure-web", cmd, {**env, "ENROLL_RATE": "1000000/min"}, ctx.workdir)


def enroll_live(fleet: Options) -> list[float]:
    """Enroll ``fleet``'s devices through the plane's API as agents do, 2 at a time; the seconds each took."""
    # The agent logs each step of its enrollment; a fleet of them would drown the benchmark's own lines.
    logging.getLogger("agent.enrollment").setLevel(logging.WARNING)
    took = log_in(dataclasses.replace(fleet, enroll_threads=2), device_ids(fleet))
    return [seconds for _, seconds in took.values()]


def run(ctx: Context) -> Section:
    sizes = ctx.sizes
    n = sizes.hold_devices
    section = Section(
        "Connections held",
        "python -m bench.run --only hold",
        notes=[
            f"{n:,} simulated devices (bench.simulate, QoS 1, real Heartbeat payloads) connect at "
            f"{sizes.hold_connect_rate:,.0f}/s and heartbeat every {sizes.hold_interval:g} s, against one Mosquitto "
            f"and one `run_bridge`, twice: on the anonymous broker (docker/mosquitto/mosquitto.conf) and on the "
            "secure one (docker/mosquitto/secure.conf: dynamic security, a login and a role a device, "
            "`ENROLLMENT_REQUIRED`), each a broker of its own. Measured over "
            f"{sizes.hold_seconds:g} s once every device has said hello and the bridge has applied the hellos. Lag "
            f"to the database: from the heartbeat's `sent_at` to the row being seen by a poller reading new rows "
            f"every {POLL_S:g} s (so it includes up to {POLL_S:g} s of polling). Settled: from the first connect "
            "until every hello is applied and the newest heartbeats are stored within a second of being sent."
        ],
    )
    _figures(section, "anonymous broker", anonymous(ctx), sizes)
    try:
        held, enrolled = secure(ctx)
    except Exception as exc:  # keep the anonymous figures; the run still fails (bench.run exits 1)
        traceback.print_exc()
        section.failed = f"the secure broker's run: {type(exc).__name__}: {exc}"
        return section
    _figures(section, "secure broker", held, sizes)
    section.figures.append(_enrollment_figure(section.title, enrolled, n))
    section.notes.append(_secure_note(enrolled))
    return section


def _figures(section: Section, where: str, held: Held, sizes) -> None:
    n, rate = held.devices, sizes.hold_connect_rate
    logged_in = " with the devices' logins" if where.startswith("secure") else ""
    counted = (f"broker counted up to {held.broker_connected:,} clients during the run" if held.broker_connected
               else "the broker's own count was not published in time")  # fmt: skip
    stored = f"{held.stored:,} of the {held.seen_bare:,} heartbeats the bare subscriber saw stored"
    p50, p99, bare50, bare99 = (held.lag.get(k) for k in ("p50", "p99", "bare50", "bare99"))
    section.figures += [
        Figure(section.title, f"devices held at a {sizes.hold_interval:g} s heartbeat, {where}, one bridge",
               held.held, "devices", ceiling=f"bare MQTT connections{logged_in} the broker accepted: "
               f"{held.accepted:,} of {n:,} opened; {counted}", target="10,000", met=held.held >= 10_000,
               note=stored),
        Figure(section.title, f"p99 lag, heartbeat sent to row in PostgreSQL, {where}", p99, "s",
               ceiling=f"bare subscriber: p99 {_s(bare99)}, p50 {_s(bare50)}", target="< 2 s",
               met=p99 is not None and p99 < 2, note=f"p50 {_s(p50)}"),
        Figure(section.title, f"settled after the connect storm, {where}", held.settled_s, "s",
               ceiling=f"the connects themselves: {n / rate:.0f} s at {rate:,.0f}/s",
               note=f"every hello applied at {held.hellos_s:.0f} s"),
    ]  # fmt: skip


def _enrollment_figure(title: str, enrolled: Enrolled, n: int) -> Figure:
    live = enrolled.live
    return Figure(title, f"a device's enrollment through the plane's API, {n:,} logins in the broker, p50",
                  percentile(live, 50), "s", ceiling="",
                  note=f"{len(live)} devices, 2 at a time; p99 {_s(percentile(live, 99))}")  # fmt: skip


def _secure_note(enrolled: Enrolled) -> str:
    return (
        f"The secure fleet: {enrolled.earlier:,} devices enrolled before the run (accepted in the database, each "
        "with its own key; their logins in the plugin's file when the broker started, made from the plane's own "
        "role and ACLs a device; bench/logins.py) and "
        f"{len(enrolled.live):,} enrolling during it through the plane's API as agents do (agent/enrollment.py: "
        "enroll, then fetch the login, which the plane creates over the broker's control topic). Mosquitto 2.0's "
        "plugin rewrites its whole file after each change, so a login costs more the more logins the broker holds: "
        "the enrollment figure is measured with the fleet's logins in the broker, before the fleet connects."
    )


def _wait_caught_up(poller: RowPoller, timeout: float) -> None:
    """Until the rows stored in the last second were sent less than a second before."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        recent = [lag for _, _, lag in poller.rows[-50:]]
        if recent and max(recent) < 1.0 + POLL_S:
            return
        time.sleep(0.5)


def _wait_stored_past(poller: RowPoller, sent_at: float, timeout: float) -> None:
    """Until a heartbeat sent after ``sent_at`` is stored: those sent before it, in the window, are too."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not any(sent > sent_at for _, sent, _ in poller.rows[-50:]):
        time.sleep(POLL_S)


def _s(value: float | None) -> str:
    return "not measured" if value is None else f"{value:.2f} s"
