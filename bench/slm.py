"""SmolLM2-135M-Instruct's variants, converted from its Q4_1 GGUF without torch, side by side.

    .venv/bin/python -m bench.slm [--out DIR] [--new-tokens 64]

For each variant (fleet/lib/gguf/convert.py): bundle size; decode tokens/s at 1 and 2
threads and time to first token for a 16-token prompt under onnxruntime-genai (each in a
fresh process, fleet/lib/gguf/measure.py, with its peak RSS); the same variant's decode
tokens/s under plain onnxruntime with the converter's own KV-cache loop at 1 thread (the
ceiling without onnxruntime-genai, fleet/lib/gguf/evaluate.py); greedy-token agreement with
the fp32 reference over the first 32 tokens of the 8 shipped prompts (teacher-forced, and
free-running as the device's self-test counts it); perplexity on the held-out text.

Then what content-defined chunking saves when one layer changes: the int8 bundle is
converted again with every weight of layer 10 scaled by 1.01 (a fine-tune of one layer),
and the chunks of the new model.onnx.data not in the old one are counted, cut both ways.

It prints a Markdown table (docs/models.md has the one this machine gave).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from agent.contract.manifest import build_manifest
from fleet.lib.chunking import chunk_lengths
from fleet.lib.gguf import convert as gguf_convert
from fleet.lib.gguf import evaluate, measure

SMOLLM2 = Path.home() / ".cache/edgefleet/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHUNK = 256 * 1024


def _bundle_size(bundle: Path) -> int:
    return sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())


def _plain_onnxruntime_tps(bundle: Path, new_tokens: int) -> float:
    session = evaluate.session_for(bundle, threads=1)
    shape = evaluate.DecoderShape.from_bundle(bundle)
    prompt = list(range(1000, 1016))
    evaluate.greedy_tokens(session, shape, prompt, 4)  # warm-up
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        evaluate.greedy_tokens(session, shape, prompt, 1)
        first = time.perf_counter() - started
        started = time.perf_counter()
        evaluate.greedy_tokens(session, shape, prompt, new_tokens)
        rates.append((new_tokens - 1) / (time.perf_counter() - started - first))
    return sorted(rates)[1]


def _one_layer_change(out: Path) -> dict:
    """Bytes an agent holding the int8 bundle fetches for one whose layer 10 changed."""
    source = gguf_convert.GGUFModel(SMOLLM2)
    weights = gguf_convert.WeightSource(source, "int8")
    original_float = weights._float

    def touched(name: str) -> np.ndarray:
        w = original_float(name)
        return w * np.float32(1.01) if name.startswith("blk.10.") else w

    weights._float = touched  # type: ignore[method-assign]
    changed = out / "int8-layer10"
    changed.mkdir(exist_ok=True)
    gguf_convert.build_decoder(source.config, weights, weights.embedding(), changed, context_length=2048)
    old, new = out / "int8" / "model.onnx.data", changed / "model.onnx.data"
    result = {"size": new.stat().st_size}
    for chunking in ("fixed", "cdc"):
        manifests = [
            build_manifest(
                p, role="model", chunk_size=CHUNK, lengths=chunk_lengths(p, chunking=chunking, average=CHUNK)
            )
            for p in (old, new)
        ]
        held = set(manifests[0].chunks)
        lengths = manifests[1].lengths or [CHUNK] * len(manifests[1].chunks)
        fetched = sum(n for h, n in zip(manifests[1].chunks, lengths, strict=True) if h not in held)
        result[chunking] = min(fetched, new.stat().st_size)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path.home() / ".cache/edgefleet/bench/slm")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--skip-delta", action="store_true")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    bundles = {}
    for variant in ("fp32", "repack", "int4", "int8"):
        bundles[variant] = args.out / variant
        gguf_convert.convert(SMOLLM2, bundles[variant], variant=variant)
    questions, heldout = evaluate.default_prompts()
    evaluation_set = evaluate.build_evaluation_set(bundles["fp32"], questions=questions, heldout=heldout)
    rows = []
    for variant, bundle in bundles.items():
        quality = evaluate.evaluate_bundle(bundle, evaluation_set)
        one = measure.measure(bundle, prompt_tokens=16, new_tokens=args.new_tokens, threads=1)
        two = measure.measure(bundle, prompt_tokens=16, new_tokens=args.new_tokens, threads=2)
        plain = _plain_onnxruntime_tps(bundle, args.new_tokens)
        rows.append((variant, _bundle_size(bundle), one, two, plain, quality))
        print(f"measured {variant} at {time.monotonic() - started:.0f} s", flush=True)
    print()
    print(f"SmolLM2-135M-Instruct (Q4_1 GGUF), {args.new_tokens} greedy tokens after a 16-token prompt; "
          f"reference perplexity {evaluation_set['reference_perplexity']:.2f} on {len(evaluation_set['heldout_ids'])} "
          "held-out tokens")  # fmt: skip
    print()
    print("| variant | size (MB) | decode tok/s, 1 thread | decode tok/s per CPU-second, 1 thread "
          "| decode tok/s, 2 threads | TTFT ms (16 tokens, 1 thread) | peak RSS MB (1 thread) "
          "| plain onnxruntime tok/s, 1 thread | token agreement (teacher-forced) "
          "| token agreement (free-running) | perplexity |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, size, one, two, plain, q in rows:
        print(f"| {variant} | {size / 1e6:.1f} | {one.decode_tokens_per_s:.1f} | {one.decode_tokens_per_cpu_s:.1f} "
              f"| {two.decode_tokens_per_s:.1f} "
              f"| {one.ttft_ms:.0f} | {one.peak_rss_bytes / 1e6:.0f} | {plain:.1f} | {q['forced_agreement']:.1%} "
              f"| {q['token_agreement']:.1%} | {q['perplexity']:.2f} |")  # fmt: skip
    if not args.skip_delta:
        delta = _one_layer_change(args.out)
        print()
        print(f"One layer (10 of 30) changed in the int8 bundle's model.onnx.data ({delta['size'] / 1e6:.1f} MB): "
              f"fetched with fixed {CHUNK // 1024} KiB chunks {delta['fixed'] / 1e6:.1f} MB, "
              f"with content-defined chunks {delta['cdc'] / 1e6:.1f} MB")  # fmt: skip
    print(f"\n{json.dumps({'seconds': round(time.monotonic() - started)})}")


if __name__ == "__main__":
    main()
