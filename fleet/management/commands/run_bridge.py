import gc
import signal
import threading

from django.conf import settings
from django.core.management.base import BaseCommand

from fleet.bridge.chunks import ChunkLimits
from fleet.bridge.metrics import BridgeMetrics
from fleet.bridge.transport import Bridge
from fleet.mqtt.client import make_client
from fleet.storage import get_store


class Command(BaseCommand):
    help = "Run the MQTT bridge: store what agents report and serve their chunk requests. Stops on SIGTERM."

    def add_arguments(self, parser):
        parser.add_argument("--chunk-workers", type=int, default=2, help="threads serving chunk requests")
        parser.add_argument("--stats-every", type=float, default=60.0, help="seconds between stats log lines")
        parser.add_argument("--name", default=settings.BRIDGE_NAME,
                            help="stable name: the broker keeps its session across restarts (BRIDGE_NAME)")  # fmt: skip
        parser.add_argument("--metrics-port", type=int, default=settings.BRIDGE_METRICS_PORT,
                            help="serve Prometheus /metrics on this port (0: off; BRIDGE_METRICS_PORT)")  # fmt: skip
        parser.add_argument("--metrics-addr", default=settings.METRICS_ADDR,
                            help="address /metrics listens on (METRICS_ADDR, 127.0.0.1 by default)")  # fmt: skip

    def handle(
        self, *args, chunk_workers: int, stats_every: float, metrics_port: int, metrics_addr: str, name: str, **options
    ):
        broker = settings.MQTT_BROKER
        bridge = Bridge(
            make_client("bridge", name=name),
            get_store(),
            shared=broker.mqtt_v5,
            queue_size=settings.BRIDGE_QUEUE_SIZE,
            batch_size=settings.BRIDGE_BATCH_SIZE,
            flush_seconds=settings.BRIDGE_FLUSH_SECONDS,
            chunk_workers=chunk_workers,
            chunk_limits=ChunkLimits.from_settings(),
            session_expiry=settings.BRIDGE_SESSION_EXPIRY if name else 0,
        )
        metrics = BridgeMetrics(bridge)
        if metrics_port:
            port = metrics.serve(metrics_port, metrics_addr)
            self.stdout.write(f"bridge metrics on http://{metrics_addr}:{port}/metrics")
        done = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: done.set())
        self.stdout.write(f"bridge connecting to {broker.host}:{broker.port} (MQTT {broker.protocol})")
        # Django, the apps and the libraries loaded by now are hundreds of thousands of objects
        # that live as long as the process; every full collection scanned them all again while
        # the bridge allocated a few objects a message. Frozen, the collector looks only at
        # what the bridge makes (docs/benchmarks.md: a third of the database thread's CPU).
        gc.freeze()
        bridge.start()
        while not done.wait(stats_every):
            self.stdout.write(f"bridge stats: {bridge.stats.snapshot()}")
        self.stdout.write("bridge stopping: draining queued messages")
        bridge.stop()
        metrics.close()
        self.stdout.write(f"bridge stopped: {bridge.stats.snapshot()}")
