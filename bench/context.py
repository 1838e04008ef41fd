"""What a benchmark run hands each benchmark: sizes, the broker, the database, the plane's env."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import Broker


@dataclass
class Sizes:
    """How big each benchmark runs; ``make bench`` and ``make bench-quick`` differ only here."""

    ingest_seconds: float = 30.0
    # A do-nothing subscriber's rate is steady within seconds; the bridge's is what must be sustained.
    ingest_ceiling_seconds: float = 15.0
    ingest_devices: int = 2000
    # Above what a bare stock-paho subscriber takes on the 2-core dev machine (26,800-28,100/s),
    # so that the ceiling is the subscriber's, not the load's: at 15,000/s both the bare
    # subscriber and one bridge took everything offered.
    ingest_rate: float = 30_000.0
    ingest_bridges: tuple[int, ...] = (1, 2, 3)
    # Heartbeats published into a broker before its consumers connect, then drained: the load
    # generator is off the two cores while the rate is taken (bench/ingestion.py).
    ingest_backlog: int = 200_000
    ingest_drain_bridges: tuple[int, ...] = (1, 2)
    ingest_drain_rounds: int = 3
    # Partitioned against unpartitioned heartbeats (bench/partitions.py): rounds of each, alternating.
    partition_rounds: int = 3
    partition_backlog: int = 150_000
    partition_rows: int = 100_000
    # bench/cluster.py: gunicorn, 3 bridges, 2 workers under the simulator. 10,000 devices every
    # 2 s (5,000/s) was more than this 2-core machine held with nine plane processes beside the
    # simulator: 611/s stored, 30 s of lag (docs/benchmarks.md).
    cluster_devices: int = 5_000
    cluster_interval: float = 5.0
    cluster_seconds: float = 40.0
    hold_devices: int = 10_000
    hold_seconds: float = 60.0
    hold_interval: float = 30.0
    hold_connect_rate: float = 1000.0
    # Of the secure run's devices, how many enroll through the plane's API during the run (the
    # rest enrolled before it, bench/logins.py): at 10,000 logins in the broker each costs it
    # two rewrites of its whole file.
    hold_enrolling: int = 20
    fanout_devices: tuple[int, ...] = (1_000, 10_000)
    transfer_devices: tuple[int, ...] = (1, 20)
    api_devices: int = 10_000
    api_clients: int = 20
    api_requests: int = 1_000


QUICK = Sizes(
    ingest_seconds=6.0,
    ingest_ceiling_seconds=4.0,
    ingest_devices=500,
    ingest_rate=15_000.0,
    ingest_bridges=(1,),
    ingest_backlog=30_000,
    ingest_drain_bridges=(1,),
    ingest_drain_rounds=1,
    partition_rounds=1,
    partition_backlog=20_000,
    partition_rows=20_000,
    cluster_devices=1_000,
    cluster_interval=1.0,
    cluster_seconds=15.0,
    hold_devices=300,
    hold_seconds=10.0,
    hold_interval=5.0,
    hold_connect_rate=500.0,
    hold_enrolling=20,
    fanout_devices=(300,),
    transfer_devices=(1, 5),
    api_devices=1_000,
    api_clients=20,
    api_requests=400,
)

# The smallest sizes: checks that everything runs, not how fast (CI's smoke test runs these).
TINY = Sizes(
    ingest_seconds=3.0,
    ingest_ceiling_seconds=2.0,
    ingest_devices=50,
    ingest_rate=2_000.0,
    ingest_bridges=(1,),
    ingest_backlog=2_000,
    ingest_drain_bridges=(1,),
    ingest_drain_rounds=1,
    partition_rounds=1,
    partition_backlog=2_000,
    partition_rows=2_000,
    cluster_devices=100,
    cluster_interval=1.0,
    cluster_seconds=6.0,
    hold_devices=50,
    hold_seconds=3.0,
    hold_interval=1.0,
    hold_connect_rate=200.0,
    hold_enrolling=10,
    fanout_devices=(50,),
    transfer_devices=(1,),
    api_devices=100,
    api_clients=4,
    api_requests=40,
)


@dataclass
class Context:
    workdir: Path
    broker: Broker
    database_url: str
    env: dict[str, str]
    sizes: Sizes
    log: Callable[[str], None] = print
    artifact_root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.artifact_root = self.workdir / "artifacts"
        self.env = {**self.env, "ARTIFACT_ROOT": str(self.artifact_root)}


class Sampler:
    """Calls ``read()`` every ``every`` seconds in a thread and keeps (time, value) pairs."""

    def __init__(self, read: Callable[[], float], every: float = 0.5) -> None:
        self.read = read
        self.every = every
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.read()))
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def rate(self, start: float, end: float) -> float:
        """The value's growth per second between the samples nearest ``start`` and ``end``."""
        inside = [(t, v) for t, v in self.samples if start <= t <= end]
        if len(inside) < 2:
            return 0.0
        (t0, v0), (t1, v1) = inside[0], inside[-1]
        return (v1 - v0) / (t1 - t0) if t1 > t0 else 0.0
