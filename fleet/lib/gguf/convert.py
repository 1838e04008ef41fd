"""GGUF to an onnxruntime-genai bundle, without torch. No Django here.

    python -m fleet.lib.gguf.convert IN.gguf OUT_DIR --variant repack [--if-stale]

Each bundle is stamped (``converter.json``) with CONVERTER_VERSION, the versions of the
packages that shape it and its parameters; ``--if-stale`` keeps a bundle stamped as this
run would stamp it, so a cache of bundles is converted again once the converter changes.

Variants:

- ``repack``: the source quantization without loss. Q4_0/Q4_1 and Q8_0 blocks become
  MatMulNBits codes as they are (Q4_1's block minimum is added back as ``blocksum(x) · m``).
  Tensors of other types are dequantized and rounded to 8 bits.
- ``int4``: every linear weight dequantized and rounded to 4 bits (RTN, block 32); the
  LM head and the token table stay 8-bit.
- ``int8``: every linear weight rounded to 8 bits (symmetric, block 32).
- ``fp32``: everything dequantized to float32: the reference the others are measured against.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from .graph import build_decoder
from .quant import BLOCK, NBits, repack_q4_1, repack_q8_0, rtn_int4, rtn_int8
from .reader import GGUFError, GGUFModel, unpermute_rows
from .tokenizer import tokenizer_config_json, tokenizer_json

VARIANTS = ("repack", "int4", "int8", "fp32")
BUNDLE_FILES = ("model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json", "genai_config.json")
# The KV cache and rotary tables are sized for this many tokens at most.
DEFAULT_CONTEXT = 2048
# Bump by hand whenever a change to this package changes the bundles it writes: a bundle
# kept in a cache (the tests' and benchmarks' model cache) and stamped otherwise is stale.
CONVERTER_VERSION = 1
# The packages that shape a bundle: onnx serializes it, numpy rounds and packs the weights,
# onnxruntime-genai reads its genai_config.json. Another version of one makes a cached bundle stale.
KEYED_PACKAGES = ("onnx", "numpy", "onnxruntime-genai")
# Written beside the bundle's files: the converter and parameters that made them (``cache_key``).
STAMP = "converter.json"

Progress = Callable[[int, int, str], None]


def _repack_q4_0(rows: np.ndarray) -> NBits:
    """Q4_0 (``d * (q - 8)``, 18-byte blocks) to MatMulNBits with its default zero point 8."""
    n = rows.shape[0]
    blocks = rows.reshape(n, -1, 18)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return NBits(4, (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8), d, None)


_REPACKERS = {"Q4_1": repack_q4_1, "Q8_0": repack_q8_0, "Q4_0": _repack_q4_0}


class WeightSource:
    """Each weight of one variant, made on demand from the memory-mapped GGUF."""

    def __init__(self, model: GGUFModel, variant: str) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
        self.model, self.variant = model, variant
        self._embedding: np.ndarray | NBits | None = None

    def _heads(self, name: str) -> int | None:
        c = self.model.config
        if name.endswith("attn_q.weight"):
            return c.num_heads
        if name.endswith("attn_k.weight"):
            return c.num_kv_heads
        return None

    def _float(self, name: str) -> np.ndarray:
        w = self.model.dequantized(name)
        heads = self._heads(name)
        return unpermute_rows(w, heads) if heads else w

    def __call__(self, name: str) -> np.ndarray | NBits:
        model = self.model
        if name == "output.weight":
            return self.lm_head()
        tensor = model.tensor(name)
        if len(tensor.shape) == 1:
            return model.dequantized(name).reshape(-1)
        if self.variant == "fp32":
            return self._float(name)
        qtype = tensor.tensor_type.name
        if self.variant == "repack" and qtype in _REPACKERS:
            rows = model.raw(name)
            heads = self._heads(name)
            return _REPACKERS[qtype](unpermute_rows(rows, heads) if heads else rows)
        w = self._float(name)
        if w.shape[1] % BLOCK:
            return w
        return rtn_int4(w) if self.variant == "int4" else rtn_int8(w)

    def embedding(self) -> np.ndarray | NBits:
        if self._embedding is None:
            name = "token_embd.weight"
            if self.variant == "fp32":
                self._embedding = self.model.dequantized(name)
            elif self.model.quant_type(name) == "Q8_0":
                self._embedding = repack_q8_0(self.model.raw(name))
            else:
                self._embedding = rtn_int8(self.model.dequantized(name))
        return self._embedding

    def lm_head(self) -> np.ndarray | NBits:
        name = self.model.lm_head_name()
        if name == "token_embd.weight":
            return self.embedding()
        if self.variant == "fp32":
            return self.model.dequantized(name)
        if self.model.quant_type(name) == "Q8_0":
            return repack_q8_0(self.model.raw(name))
        return rtn_int8(self.model.dequantized(name))


def genai_config(model: GGUFModel, context_length: int) -> dict:
    c = model.config
    return {
        "model": {
            "bos_token_id": c.bos_token_id,
            "context_length": context_length,
            "decoder": {
                # No CPU memory arena: SmolLM2's repack peaks at 248 MB without it, 267 MB with it,
                # at the same speed (the arena keeps the prefill's chunks for the whole session).
                "session_options": {
                    "log_id": "onnxruntime-genai",
                    "provider_options": [],
                    "enable_cpu_mem_arena": False,
                },
                "filename": "model.onnx",
                "head_size": c.head_size,
                "hidden_size": c.hidden_size,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": c.num_heads,
                "num_hidden_layers": c.num_layers,
                "num_key_value_heads": c.num_kv_heads,
            },
            "eos_token_id": c.eos_token_id,
            "pad_token_id": c.pad_token_id,
            "type": c.architecture,
            "vocab_size": c.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # The cache grows with the tokens actually used instead of being max_length long.
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def package_versions() -> dict[str, str]:
    """The installed versions of KEYED_PACKAGES ("absent" for one not installed)."""
    found = {}
    for name in KEYED_PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def cache_key(
    *,
    variant: str,
    context_length: int,
    accuracy_level: int,
    versions: Mapping[str, str] | None = None,
) -> dict:
    """What a bundle converted now with these parameters is stamped with; a cached one stamped otherwise is stale."""
    return {
        "converter": CONVERTER_VERSION,
        "packages": dict(package_versions() if versions is None else versions),
        "variant": variant,
        "context_length": context_length,
        "accuracy_level": accuracy_level,
    }


def is_current(out_dir: str | Path, key: Mapping) -> bool:
    """True when ``out_dir`` holds a whole bundle stamped with ``key``: a cache may use it as it is."""
    out = Path(out_dir)
    try:
        stamped = json.loads((out / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamped == dict(key) and all((out / name).is_file() for name in BUNDLE_FILES)


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert(
    src: str | Path,
    out_dir: str | Path,
    *,
    variant: str = "repack",
    context_length: int = DEFAULT_CONTEXT,
    accuracy_level: int = 4,
    progress: Progress | None = None,
) -> dict:
    """Write the bundle for one variant into ``out_dir`` (replaced if present); return its recipe.

    ``accuracy_level`` is MatMulNBits': 4 rounds activations to int8 and is the fast one on
    CPU (about 10x); 0 computes in float32 and makes ``repack`` match the GGUF exactly.
    """
    model = GGUFModel(src)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx = min(context_length, model.config.context_length)
    weights = WeightSource(model, variant)
    build_decoder(
        model.config,
        weights,
        weights.embedding(),
        tmp,
        progress=progress,
        context_length=ctx,
        accuracy_level=accuracy_level,
    )
    _write_json(tmp / "tokenizer.json", tokenizer_json(model))
    _write_json(tmp / "tokenizer_config.json", tokenizer_config_json(model))
    _write_json(tmp / "genai_config.json", genai_config(model, ctx))
    key = cache_key(variant=variant, context_length=context_length, accuracy_level=accuracy_level)
    _write_json(tmp / STAMP, key)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {
        "tool": "fleet.lib.gguf.convert",
        "parameters": {
            "variant": variant,
            "context_length": ctx,
            "block_size": BLOCK,
            "accuracy_level": accuracy_level,
        },
        "converter": {"version": CONVERTER_VERSION, "packages": key["packages"]},
        "source": model.summary(),
        "files": {name: (out / name).stat().st_size for name in BUNDLE_FILES},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fleet.lib.gguf.convert", description=__doc__.split("\n")[0])
    parser.add_argument("src", type=Path, help="a GGUF file (llama architecture, GPT-2 BPE tokenizer)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--variant", choices=VARIANTS, default="repack")
    parser.add_argument("--context-length", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--accuracy-level", type=int, choices=(0, 1, 2, 3, 4), default=4)
    parser.add_argument(
        "--if-stale",
        action="store_true",
        help="keep OUT_DIR if it holds a bundle this converter made with these parameters (a cache)",
    )
    args = parser.parse_args(argv)
    key = cache_key(variant=args.variant, context_length=args.context_length, accuracy_level=args.accuracy_level)
    if args.if_stale and is_current(args.out_dir, key):
        print(f"{args.out_dir}: up to date (converter {CONVERTER_VERSION})")
        return 0
    started = time.monotonic()

    def report(done: int, total: int, message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {done}/{total} {message}", file=sys.stderr, flush=True)

    try:
        recipe = convert(
            args.src,
            args.out_dir,
            variant=args.variant,
            context_length=args.context_length,
            accuracy_level=args.accuracy_level,
            progress=report,
        )
    except (GGUFError, OSError) as exc:
        parser.exit(2, f"convert: {exc}\n")
    for name, size in recipe["files"].items():
        print(f"{size / 1e6:9.1f} MB  {args.out_dir / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
