"""The agent's own ``/metrics`` in Prometheus' text format, opt-in (``[metrics] enabled = true``).

Stdlib only: a device should not carry a metrics library for a page a few hundred bytes
long. Inference latency is recorded for every local request whether or not the page is
served (a few additions under a lock); the download and outbox figures are read when
Prometheus scrapes. A generative runtime reports each finished generation through
``AgentMetrics.observe_generation``: time to first token, tokens, and the time they took.
Names follow docs/metrics.md.
"""

from __future__ import annotations

import bisect
import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final, cast

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH: Final = "/metrics"
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TTFT_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
TOKENS_PER_SECOND_BUCKETS: Final = (1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
OUTCOMES: Final = ("ok", "error", "fault")


class Histogram:
    """A Prometheus histogram without labels; thread-safe."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help_text
        self.bounds = tuple(buckets)
        self._counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, n in zip((*self.bounds, math.inf), counts, strict=True):
            running += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_number(total)}", f"{self.name}_count {running}"]
        return lines


@dataclass(frozen=True)
class Sample:
    """One value of a gauge or counter read at scrape time."""

    name: str
    kind: str  # "gauge" or "counter"
    help: str
    value: float


class AgentMetrics:
    """Everything the agent's /metrics shows; the HTTP server's threads and a generator record into it."""

    def __init__(self) -> None:
        self.inference = Histogram(
            "edgefleet_inference_duration_seconds",
            "Local inference requests that succeeded: how long each took, as the caller saw it.",
            LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "edgefleet_time_to_first_token_seconds", "Generations: time to the first output token.", TTFT_BUCKETS
        )
        self.inter_token = Histogram(
            "edgefleet_inter_token_latency_seconds",
            "Generations: mean time between two output tokens after the first.",
            TOKEN_LATENCY_BUCKETS,
        )
        self.tokens_per_second = Histogram(
            "edgefleet_output_tokens_per_second", "Generations: output tokens a second, first token included.",
            TOKENS_PER_SECOND_BUCKETS,
        )  # fmt: skip
        self._lock = threading.Lock()
        self._requests = dict.fromkeys(OUTCOMES, 0)
        self._tokens = 0
        self._generations = 0

    def observe_inference(self, seconds: float, *, ok: bool, fault: bool = False) -> None:
        """One local request: ``ok``, or failed in the model (``fault``), or refused for its input."""
        outcome = "ok" if ok else "fault" if fault else "error"
        with self._lock:
            self._requests[outcome] += 1
        if ok:
            self.inference.observe(seconds)

    def observe_generation(self, *, ttft_s: float, output_tokens: int, duration_s: float) -> None:
        """One finished generation: its first token after ``ttft_s``, ``output_tokens`` in ``duration_s``."""
        if output_tokens <= 0 or duration_s <= 0:
            return
        self.ttft.observe(ttft_s)
        if output_tokens > 1:
            self.inter_token.observe(max(0.0, duration_s - ttft_s) / (output_tokens - 1))
        self.tokens_per_second.observe(output_tokens / duration_s)
        with self._lock:
            self._tokens += output_tokens
            self._generations += 1

    def render(self, samples: Iterable[Sample] = ()) -> bytes:
        with self._lock:
            requests, tokens, generations = dict(self._requests), self._tokens, self._generations
        name = "edgefleet_inference_requests_total"
        lines = [f"# HELP {name} Local inference requests, by outcome.", f"# TYPE {name} counter"]
        lines += [f'{name}{{outcome="{outcome}"}} {n}' for outcome, n in requests.items()]
        for histogram in (self.inference, self.ttft, self.inter_token, self.tokens_per_second):
            lines += histogram.render()
        extra = [
            Sample("edgefleet_generation_tokens_total", "counter", "Output tokens generated.", tokens),
            Sample("edgefleet_generations_total", "counter", "Generations finished.", generations),
            *samples,
        ]
        for sample in extra:
            lines += [
                f"# HELP {sample.name} {sample.help}",
                f"# TYPE {sample.name} {sample.kind}",
                f"{sample.name} {_number(sample.value)}",
            ]
        return ("\n".join(lines) + "\n").encode()


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


class MetricsServer:
    """Serves ``/metrics`` from a daemon thread; ``samples`` reads the agent's gauges at each scrape."""

    def __init__(
        self, metrics: AgentMetrics, samples: Callable[[], list[Sample]], *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._httpd = _Server((host, port), metrics, samples)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.1,), name="agent-metrics", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("metrics.listening host=%s port=%d", self._httpd.server_address[0], self.port)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], metrics: AgentMetrics, samples: Callable[[], list[Sample]]) -> None:
        super().__init__(address, _Handler)
        self.metrics = metrics
        self.samples = samples


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgefleet-agent"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != METRICS_PATH:
            self._send(HTTPStatus.NOT_FOUND, b"no such path; try /metrics\n", "text/plain")
            return
        server = cast(_Server, self.server)
        try:
            body = server.metrics.render(server.samples())
        except Exception:
            log.exception("metrics.render_failed")
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"metrics failed; see the agent's log\n", "text/plain")
            return
        self._send(HTTPStatus.OK, body, CONTENT_TYPE)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics.request %s", format % args)
