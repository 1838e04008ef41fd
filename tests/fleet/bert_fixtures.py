"""A tiny BERT checkpoint on disk (config.json, model.safetensors, tokenizer.json), made with numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from fleet.lib.evaluation import default_sentences

TINY = {
    "model_type": "bert",
    "architectures": ["BertModel"],
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 128,
    "type_vocab_size": 2,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
}


def _words() -> list[str]:
    words = sorted({w.strip(".,?'").lower() for s in default_sentences() for w in s.split()})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]


def tiny_weights(config: dict, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i = config["hidden_size"], config["intermediate_size"]

    def normal(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    weights = {
        "embeddings.word_embeddings.weight": normal(vocab_size, h),
        "embeddings.position_embeddings.weight": normal(config["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": normal(2, h),
        "embeddings.LayerNorm.weight": np.ones(h, np.float32),
        "embeddings.LayerNorm.bias": np.zeros(h, np.float32),
    }
    for n in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{n}"
        for name, (out, inp) in {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (i, h),
            "output.dense": (h, i),
        }.items():
            weights[f"{p}.{name}.weight"] = normal(out, inp)
            weights[f"{p}.{name}.bias"] = normal(out)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            weights[f"{p}.{norm}.weight"] = np.ones(h, np.float32)
            weights[f"{p}.{norm}.bias"] = np.zeros(h, np.float32)
    return weights


def write_tiny_checkpoint(directory: Path, *, prefix: str = "") -> Path:
    """A BERT-family checkpoint small enough to import, quantize and evaluate in a second or two."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(_words())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps(TINY))
    weights = tiny_weights(TINY, len(vocab))
    save_file({f"{prefix}{k}": v for k, v in weights.items()}, str(directory / "model.safetensors"))
    return directory
