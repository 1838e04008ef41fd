"""What emulation costs: the agent's int8 MiniLM natively (x86_64) and in the emulated arm64 root.

    .venv/bin/python -m bench.arm64_emulation --root "$(bash scripts/arm64/root.sh)" [--runs 20]

It times, with the agent's own runtime (``agent.runtime.load_model``), loading the
model (session and warm-up check) and ``embed`` of one sentence, once in this process
and once as ``python -m bench.arm64_emulation --measure`` inside the root
(scripts/arm64/run.sh, qemu-user with QEMU_CPU=neoverse-n1). Prints a Markdown table
for docs/agent.md. A figure for the emulator, never for a device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from agent.contract import wire
from agent.runtime import ModelInfo, load_model

REPO = Path(__file__).resolve().parent.parent
SENTENCE = "A man is eating a piece of bread."


def measure(model_dir: Path, runs: int) -> dict:
    start = time.perf_counter()
    loaded = load_model(
        model_dir / "model.int8.onnx",
        spec=wire.InferenceSpec(task="embedding", pooling="mean", normalize=True),
        info=ModelInfo(deployment_id=0, sha256="bench"),
        tokenizer_path=model_dir / "tokenizer.json",
    )
    load_s = time.perf_counter() - start
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        loaded.embed([SENTENCE])
        times.append((time.perf_counter() - start) * 1000)
    return {"arch": platform.machine(), "load_s": load_s, "embed_p50_ms": statistics.median(times)}


def compare(root: str, model_dir: Path, runs: int) -> None:
    native = measure(model_dir, runs)
    inside = [
        str(REPO / "scripts" / "arm64" / "run.sh"), root,
        "--bind", f"{REPO}:/opt/edgefleet/src", "--bind", f"{model_dir}:/opt/edgefleet/model",
        "--env", "PYTHONPATH=/opt/edgefleet/src", "--env", "PYTHONDONTWRITEBYTECODE=1", "--",
        "python", "-m", "bench.arm64_emulation", "--measure", "/opt/edgefleet/model", "--runs", str(runs),
    ]  # fmt: skip
    emulated = json.loads(subprocess.run(inside, check=True, capture_output=True, text=True).stdout)
    print("| int8 MiniLM, agent runtime | native x86_64 | emulated aarch64 | ratio |")
    print("|---|---|---|---|")
    for key, label, unit in (("load_s", "load and check", "s"), ("embed_p50_ms", "embed 1 sentence, p50", "ms")):
        ratio = emulated[key] / native[key]
        print(f"| {label} | {native[key]:.2f} {unit} | {emulated[key]:.2f} {unit} | {ratio:.0f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="the arm64 root (scripts/arm64/root.sh prints it)")
    parser.add_argument("--measure", type=Path, help="measure here, in a model directory, and print JSON")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.runs)))
    elif args.root:
        from tests.support import MINILM_DIR

        compare(args.root, MINILM_DIR, args.runs)
    else:
        sys.exit("give --root (or --measure)")


if __name__ == "__main__":
    main()
