"""Speed and memory of a generative bundle under onnxruntime-genai, in a fresh process.

    python -m fleet.lib.gguf.measure BUNDLE_DIR --prompt-tokens 16 --new-tokens 64 --threads 1

Prints one JSON line: time to first token for a prompt of ``--prompt-tokens`` tokens,
decode tokens/s (the tokens after the first, over the time they took) and the process's
peak RSS, which includes the interpreter: what a device would see.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class GenerationPerformance:
    """One bundle's measured speed and memory on this CPU."""

    ttft_ms: float
    decode_tokens_per_s: float
    peak_rss_bytes: int
    # Decode tokens per second of this process's CPU time: on a CPU shared with other work,
    # what one thread would reach on an idle core (wall-clock figures then fall short).
    decode_tokens_per_cpu_s: float
    new_tokens: int
    threads: int


# A neutral filler the prompt is cut from, so every variant sees the same ids.
_FILLER = "The quick brown fox jumps over the lazy dog while the farmer watches from the gate. " * 8


def measure_here(bundle: Path, *, prompt_tokens: int = 16, new_tokens: int = 64, threads: int = 1) -> dict:
    import onnxruntime_genai as og  # type: ignore[import-untyped]  # the wheel ships no type hints

    config = og.Config(str(bundle))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    ids = [int(t) for t in tokenizer.encode(_FILLER)][:prompt_tokens]

    def run() -> tuple[float, float, int, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + new_tokens, min_length=len(ids) + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        started = time.perf_counter()
        generator.append_tokens(ids)
        generator.generate_next_token()
        first = time.perf_counter()
        first_cpu = time.process_time()
        count = 1
        while not generator.is_done():
            generator.generate_next_token()
            count += 1
        done, done_cpu = time.perf_counter(), time.process_time()
        return (first - started) * 1000, (count - 1) / (done - first), count, (count - 1) / (done_cpu - first_cpu)

    run()  # warm-up: the first run allocates and prepacks
    results = [run() for _ in range(3)]
    ttft = sorted(r[0] for r in results)[1]
    tps = sorted(r[1] for r in results)[1]
    cpu_tps = sorted(r[3] for r in results)[1]
    peak = _peak_rss()
    return asdict(GenerationPerformance(ttft, tps, peak, cpu_tps, results[0][2], threads))


def _peak_rss() -> int:
    """VmHWM, which starts afresh at exec: ru_maxrss would carry the parent's peak (a Celery
    worker's, the bench's) into this subprocess. Read here rather than through
    fleet.lib.evaluation, whose numpy import would count in the figure."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    # ru_maxrss: KiB on Linux, bytes on macOS.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def measure(bundle: Path, *, prompt_tokens: int = 16, new_tokens: int = 64, threads: int = 1, timeout: float = 900):
    """``measure_here`` in a fresh subprocess, so peak RSS is this bundle's alone."""
    command = [
        sys.executable,
        "-m",
        "fleet.lib.gguf.measure",
        str(bundle),
        f"--prompt-tokens={prompt_tokens}",
        f"--new-tokens={new_tokens}",
        f"--threads={threads}",
    ]
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=root, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {bundle.name} failed: {done.stderr.strip()[-2000:]}")
    return GenerationPerformance(**json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(measure_here(args.bundle, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                  threads=args.threads)))  # fmt: skip


if __name__ == "__main__":
    main()
