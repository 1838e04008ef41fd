"""What the agent's OpenAI-compatible path costs a generation, against onnxruntime-genai called directly.

    .venv/bin/python -m bench.agent_generate [--bundle DIR] [--tokens 64] [--repeat 5] [--threads 1]

One process, one model load. The same chat prompt, greedy, the same number of
tokens, three ways, interleaved round by round so load on the machine hits all alike:

- ``direct``: onnxruntime-genai's own loop (Generator, append_tokens,
  generate_next_token, the tokenizer stream's decode), the reference;
- ``http``: ``POST /v1/chat/completions`` to the agent's InferenceServer serving
  that same model, the whole answer in one response;
- ``sse``: the same with ``stream: true``, read event by event as a client would.

Decode tok/s is (tokens - 1) over the time from the first token to the last, as
seen by the caller; a whole answer has no per-token timing, so for http only the
total time counts. TTFT is from the call to the first token. The cost of the
agent's path: for sse, 1 - median decode tok/s (sse) / (direct); for http, the
extra total time over direct's. Prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from agent.config import GenerationConfig
from agent.contract import wire
from agent.generate import ChatMessage, LoadedGenerator, OgEngine, Sampling
from agent.runtime import ModelInfo, Runner
from agent.server import InferenceServer
from agent.telemetry import GenerationRecorder, LatencyRecorder

BUNDLES = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet")) / "models" / "smollm2-onnx"
# Long enough an answer that SmolLM2 does not stop before the token budget.
QUESTION = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def default_bundle() -> Path:
    """The int4 bundle the tests use, converted again first if this converter did not make it
    (``--if-stale``, keyed by its version and packages); else any bundle in the cache."""
    from tests.agent.generators import smollm2_bundle

    current = smollm2_bundle()
    if current is not None:
        return current
    variants = sorted(p.parent for p in BUNDLES.glob("*/genai_config.json"))
    if not variants:
        sys.exit(f"no bundle under {BUNDLES}: build one with the GGUF converter first (make models)")
    preferred = [v for v in variants if v.name == "int4"]  # the variant the converter's notes ship
    return (preferred or variants)[0]


Figures = tuple[float, float, int, float]  # TTFT ms, decode tok/s, tokens, total ms
# Every gap between two tokens each path saw, in ms: the median gap shrugs off the pre-emptions
# of a shared machine that swing a whole run's tok/s by 20%.
GAPS: dict[str, list[float]] = {"direct": [], "sse": []}
WARMING = True


def direct(engine: OgEngine, prompt_ids: list[int], tokens: int) -> Figures:
    """onnxruntime-genai alone."""
    import numpy as np

    og = engine._og
    started = time.perf_counter()
    params = og.GeneratorParams(engine.model)
    params.set_search_options(max_length=len(prompt_ids) + tokens, do_sample=False, batch_size=1)
    generator = og.Generator(engine.model, params)
    stream = engine.tokenizer.create_stream()
    generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
    stamps: list[float] = []
    while not generator.is_done():
        generator.generate_next_token()
        stream.decode(int(generator.get_next_tokens()[0]))
        stamps.append(time.perf_counter())
    del generator
    return _figures(started, stamps, "direct")


def over_http(port: int, tokens: int) -> Figures:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps(_request(tokens)).encode()
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    answer = json.loads(connection.getresponse().read())
    elapsed = time.perf_counter() - started
    connection.close()
    return float("nan"), float("nan"), answer["usage"]["completion_tokens"], elapsed * 1000


def over_sse(port: int, tokens: int, *, record: bool = True) -> Figures:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({**_request(tokens), "stream": True}).encode()
    started = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    stamps: list[float] = []
    for line in response:
        if line.startswith(b"data: {") and b'"content":' in line and b'"role"' not in line:
            stamps.append(time.perf_counter())
    connection.close()
    return _figures(started, stamps, "sse" if record else "")


class NullEngine:
    """Tokens for free: what is left of a streamed generation's time is the agent's path alone."""

    context_length = 1 << 20
    eos_token_ids = frozenset({0})

    def encode(self, text: str) -> list[int]:
        return [1] * len(text.split())

    def render_chat(self, messages: object) -> str:
        return "prompt"

    def tokens(self, prompt_ids: object, sampling: Sampling) -> Iterator[int]:
        return iter([1] * sampling.max_tokens)

    def detokenizer(self) -> Callable[[int], str]:
        return lambda token: " word"


def path_cost_us(tokens: int = 5000) -> float:
    """Microseconds the agent's SSE path spends per token, model aside: chunk, encode, write, client read."""
    runner = Runner()
    runner.install(
        LoadedGenerator(NullEngine(), wire.InferenceSpec(task="generate"), ModelInfo(deployment_id=1, sha256="0" * 64))
    )
    server = InferenceServer(runner, LatencyRecorder(), generations=GenerationRecorder(), port=0)
    server.start()
    try:
        over_sse(server.port, 100)  # warm-up
        best = min(_timed_sse(server.port, tokens) for _ in range(3))
    finally:
        server.stop()
    return best / tokens * 1e6


def _timed_sse(port: int, tokens: int) -> float:
    started = time.perf_counter()
    over_sse(port, tokens, record=False)
    return time.perf_counter() - started


def _request(tokens: int) -> dict[str, object]:
    return {
        "model": "bench",
        "messages": [{"role": "user", "content": QUESTION}],
        "temperature": 0,
        "max_tokens": tokens,
    }


def _figures(started: float, stamps: list[float], path: str) -> Figures:
    if path and not WARMING:
        GAPS[path].extend((b - a) * 1000 for a, b in zip(stamps, stamps[1:], strict=False))
    ttft = (stamps[0] - started) * 1000
    tps = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return ttft, tps, len(stamps), (stamps[-1] - started) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=GenerationConfig().thread_count())
    args = parser.parse_args()
    bundle = args.bundle or default_bundle()
    engine = OgEngine(bundle, threads=args.threads)
    model = LoadedGenerator(engine, wire.InferenceSpec(task="generate"), ModelInfo(deployment_id=1, sha256="0" * 64))
    prompt_ids = model.prompt_ids([ChatMessage("user", QUESTION)])
    runner = Runner()
    runner.install(model)
    server = InferenceServer(runner, LatencyRecorder(), generations=GenerationRecorder(), port=0)
    server.start()
    ways = {
        "direct": lambda: direct(engine, prompt_ids, args.tokens),
        "http": lambda: over_http(server.port, args.tokens),
        "sse": lambda: over_sse(server.port, args.tokens),
    }
    results: dict[str, list[Figures]] = {name: [] for name in ways}
    try:
        for way in ways.values():  # warm-up: the first generation pays for arena growth
            way()
        global WARMING
        WARMING = False
        names = list(ways)
        for round_ in range(args.repeat):  # each round in another order: no path always runs first
            for name in names[round_ % 3 :] + names[: round_ % 3]:
                results[name].append(ways[name]())
    finally:
        server.stop()
    print(report(bundle, args, prompt_ids, results))
    cost = path_cost_us()
    reference = statistics.median(r[1] for r in results["direct"])
    print(
        f"\nThe SSE path alone (a null engine that makes tokens for free, 5000 tokens, best of 3): "
        f"{cost:.0f} µs per token, {cost * reference / 1e4:.2f}% of a token's time at the reference's "
        f"{reference:.1f} tok/s."
    )
    return 0


def report(bundle: Path, args: argparse.Namespace, prompt_ids: list[int], results: dict[str, list[Figures]]) -> str:
    def median(name: str, index: int) -> float:
        return statistics.median(r[index] for r in results[name])

    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; bundle `{bundle.name}`, "
        f"{args.threads} thread(s), prompt {len(prompt_ids)} tokens, {args.tokens} tokens greedy, "
        f"median of {args.repeat} (interleaved).",
        "",
        "| path | TTFT (ms) | decode tok/s | tok/s from the median token gap | tokens | total (ms) | cost vs direct |",
        "|---|---|---|---|---|---|---|",
    ]
    gap = {path: statistics.median(gaps) for path, gaps in GAPS.items()}
    costs = {
        "direct": "—",
        "http": f"{(median('http', 3) / median('direct', 3) - 1) * 100:+.1f}% total time",
        "sse": f"{(1 - median('sse', 1) / median('direct', 1)) * 100:+.1f}% decode tok/s; "
        f"{(gap['sse'] / gap['direct'] - 1) * 100:+.1f}% median token gap",
    }
    labels = {
        "direct": "onnxruntime-genai directly (reference)",
        "http": "`POST /v1/chat/completions`, whole answer",
        "sse": "`POST /v1/chat/completions`, `stream: true` (SSE)",
    }
    for name in ("direct", "http", "sse"):
        ttft, tps = median(name, 0), median(name, 1)
        shown = ["—" if x != x else f"{x:.1f}" for x in (ttft, tps)]  # NaN: not measurable on this path
        steady = f"{1000 / gap[name]:.1f}" if name in gap else "—"
        tokens, total = int(median(name, 2)), median(name, 3)
        lines.append(
            f"| {labels[name]} | {shown[0]} | {shown[1]} | {steady} | {tokens} | {total:.0f} | {costs[name]} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
