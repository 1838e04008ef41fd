"""A GGUF file's metadata and tensors, read through the ``gguf`` package's memory map.

Nothing here loads the whole file: ``gguf.GGUFReader`` maps it, and a tensor's bytes are
only read when a converter asks for that tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama",)


class GGUFError(ValueError):
    """The file is not a GGUF this converter can read, or lacks something it needs."""


@dataclass(frozen=True)
class LlamaConfig:
    """The sizes of a llama-architecture decoder, as its GGUF metadata gives them."""

    architecture: str
    name: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    context_length: int
    rope_theta: float
    rms_eps: float
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    file_type: int

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads


class GGUFModel:
    """An open GGUF file: its config, tokenizer fields and tensors by name."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError) as exc:
            raise GGUFError(f"{self.path.name}: not a readable GGUF file ({exc})") from exc
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = self._config()

    def field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        if field is None:
            return default
        return field.contents()

    def _required(self, key: str):
        value = self.field(key)
        if value is None:
            raise GGUFError(f"{self.path.name}: metadata key {key!r} is missing")
        return value

    def _config(self) -> LlamaConfig:
        arch = self.field("general.architecture", "")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise GGUFError(
                f"{self.path.name}: architecture {arch!r} is not supported (only {SUPPORTED_ARCHITECTURES})"
            )
        heads = int(self._required(f"{arch}.attention.head_count"))
        eos = int(self.field("tokenizer.ggml.eos_token_id", 0))
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise GGUFError(f"{self.path.name}: tensor token_embd.weight is missing")
        return LlamaConfig(
            architecture=arch,
            name=str(self.field("general.name", self.path.stem)),
            num_layers=int(self._required(f"{arch}.block_count")),
            hidden_size=int(self._required(f"{arch}.embedding_length")),
            intermediate_size=int(self._required(f"{arch}.feed_forward_length")),
            num_heads=heads,
            num_kv_heads=int(self.field(f"{arch}.attention.head_count_kv", heads)),
            vocab_size=int(self.field(f"{arch}.vocab_size", int(embd.shape[1]))),
            context_length=int(self.field(f"{arch}.context_length", 2048)),
            rope_theta=float(self.field(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(self.field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
            bos_token_id=int(self.field("tokenizer.ggml.bos_token_id", 1)),
            eos_token_id=eos,
            pad_token_id=int(self.field("tokenizer.ggml.padding_token_id", eos)),
            file_type=int(self.field("general.file_type", 0)),
        )

    def tensor(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path.name}: tensor {name!r} is missing") from None

    def quant_type(self, name: str) -> str:
        return self.tensor(name).tensor_type.name

    def raw(self, name: str) -> np.ndarray:
        """The tensor's stored rows: (rows, bytes per row) for quantized types, else the values."""
        return np.asarray(self.tensor(name).data)

    def dequantized(self, name: str) -> np.ndarray:
        """The tensor as float32, in numpy (row-major, output-first) order."""
        import gguf

        tensor = self.tensor(name)
        return np.ascontiguousarray(
            gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), dtype=np.float32
        )

    def lm_head_name(self) -> str:
        return "output.weight" if "output.weight" in self.tensors else "token_embd.weight"

    def summary(self) -> dict:
        """What the registry stores about the source: sizes, quantization, chat template."""
        counts: dict[str, int] = {}
        for tensor in self.reader.tensors:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        c = self.config
        return {
            "architecture": c.architecture,
            "name": c.name,
            "num_layers": c.num_layers,
            "hidden_size": c.hidden_size,
            "num_heads": c.num_heads,
            "num_kv_heads": c.num_kv_heads,
            "vocab_size": c.vocab_size,
            "context_length": c.context_length,
            "tensor_types": counts,
            "tokenizer": str(self.field("tokenizer.ggml.model", "")),
            "chat_template": bool(self.field("tokenizer.chat_template")),
            "license": str(self.field("general.license", "")),
        }


def unpermute_rows(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of the Q and K rows (its convert script interleaves each
    head's two rotary halves), giving the Hugging Face order that half-rotation RoPE expects.

    Works on dequantized weights and on quantized rows alike: only whole rows move.
    """
    n = rows.shape[0]
    return rows.reshape(n_heads, n // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
