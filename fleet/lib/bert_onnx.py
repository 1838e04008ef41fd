"""A BERT-family encoder as an fp32 ONNX graph, built with onnx.helper from safetensors weights.

No torch and no Django: numpy, safetensors and onnx only. ``reference_forward`` runs the
same maths in numpy, so an export can be checked against the weights it came from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # LayerNormalization is a standard op from 17 on.
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
# Added to the scores of padding positions. Not finfo.min: it must survive an fp16 variant.
_MASKED_SCORE = -10000.0


class CheckpointError(ValueError):
    """A checkpoint this builder cannot turn into a graph; the text says why."""


@dataclass(frozen=True)
class BertConfig:
    hidden_size: int
    num_attention_heads: int
    num_hidden_layers: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_file(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") not in ("bert", None) and "Bert" not in "".join(raw.get("architectures", [])):
            raise CheckpointError(f"{path.name}: model_type {raw.get('model_type')!r} is not BERT-family")
        if raw.get("hidden_act", "gelu") != "gelu":
            raise CheckpointError(f"{path.name}: hidden_act {raw['hidden_act']!r} is not supported, only gelu")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise CheckpointError(f"{path.name}: only absolute position embeddings are supported")
        try:
            return cls(
                hidden_size=int(raw["hidden_size"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                num_hidden_layers=int(raw["num_hidden_layers"]),
                intermediate_size=int(raw["intermediate_size"]),
                max_position_embeddings=int(raw.get("max_position_embeddings", 512)),
                type_vocab_size=int(raw.get("type_vocab_size", 2)),
                layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)),
            )
        except KeyError as exc:
            raise CheckpointError(f"{path.name} has no {exc.args[0]!r}") from None


def load_weights(path: Path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors by name, without a ``bert.`` prefix, as float32."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    weights = {}
    for name, value in tensors.items():
        name = name.removeprefix("bert.")
        weights[name] = value.astype(np.float32) if value.dtype.kind == "f" else value
    return weights


def _weight(weights: dict[str, np.ndarray], name: str) -> np.ndarray:
    try:
        return weights[name]
    except KeyError:
        raise CheckpointError(f"the checkpoint has no tensor {name!r}") from None


class _GraphBuilder:
    """Collects nodes and initializers, naming each output once."""

    def __init__(self, weights: dict[str, np.ndarray]) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name=name))
        return name

    def param(self, name: str, transpose: bool = False) -> str:
        value = _weight(self.weights, name)
        # nn.Linear stores [out, in]; MatMul wants [in, out].
        return self.const(name, np.ascontiguousarray(value.T) if transpose else value)

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        self._count += 1
        out = f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"{op_type}_{self._count}", **attrs))
        return out

    def linear(self, x: str, prefix: str) -> str:
        return self.op(
            "Add", [self.op("MatMul", [x, self.param(f"{prefix}.weight", True)]), self.param(f"{prefix}.bias")]
        )

    def layer_norm(self, x: str, prefix: str, eps: float) -> str:
        return self.op(
            "LayerNormalization",
            [x, self.param(f"{prefix}.weight"), self.param(f"{prefix}.bias")],
            axis=-1,
            epsilon=eps,
        )


def build_bert_onnx(config: BertConfig, weights: dict[str, np.ndarray], *, name: str = "bert") -> onnx.ModelProto:
    """The encoder as ``(input_ids, attention_mask, token_type_ids) -> last_hidden_state``."""
    g = _GraphBuilder(weights)
    hidden, heads, head_size = config.hidden_size, config.num_attention_heads, config.head_size
    words = g.op("Gather", [g.param("embeddings.word_embeddings.weight"), "input_ids"])
    types = g.op("Gather", [g.param("embeddings.token_type_embeddings.weight"), "token_type_ids"])
    # Slice the position table to the sequence length: ORT rewrites Gather(table, Range(0, n))
    # into a Slice of its own that fails at run time.
    seq_len = g.op("Shape", ["input_ids"], start=1, end=2)
    positions = g.op(
        "Slice",
        [
            g.param("embeddings.position_embeddings.weight"),
            g.const("zero", np.array([0], np.int64)),
            seq_len,
            g.const("axis0", np.array([0], np.int64)),
        ],
    )
    x = g.op("Add", [g.op("Add", [words, types]), positions])
    x = g.layer_norm(x, "embeddings.LayerNorm", config.layer_norm_eps)

    mask = g.op("Cast", ["attention_mask"], to=TensorProto.FLOAT)
    mask = g.op("Unsqueeze", [mask, g.const("mask_axes", np.array([1, 2], np.int64))])
    mask = g.op(
        "Mul",
        [
            g.op("Sub", [g.const("one", np.array(1.0, np.float32)), mask]),
            g.const("masked", np.array(_MASKED_SCORE, np.float32)),
        ],
    )
    split_heads = g.const("split_heads", np.array([0, 0, heads, head_size], np.int64))
    merge_heads = g.const("merge_heads", np.array([0, 0, hidden], np.int64))
    scale = g.const("scale", np.array(1.0 / math.sqrt(head_size), np.float32))
    half = g.const("half", np.array(0.5, np.float32))
    sqrt2 = g.const("sqrt2", np.array(math.sqrt(2.0), np.float32))
    one = "one"

    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"
        q = g.op(
            "Transpose", [g.op("Reshape", [g.linear(x, f"{p}.attention.self.query"), split_heads])], perm=[0, 2, 1, 3]
        )
        k = g.op(
            "Transpose", [g.op("Reshape", [g.linear(x, f"{p}.attention.self.key"), split_heads])], perm=[0, 2, 3, 1]
        )
        v = g.op(
            "Transpose", [g.op("Reshape", [g.linear(x, f"{p}.attention.self.value"), split_heads])], perm=[0, 2, 1, 3]
        )
        scores = g.op("Add", [g.op("Mul", [g.op("MatMul", [q, k]), scale]), mask])
        context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), v])
        context = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), merge_heads])
        attended = g.op("Add", [g.linear(context, f"{p}.attention.output.dense"), x])
        x = g.layer_norm(attended, f"{p}.attention.output.LayerNorm", config.layer_norm_eps)
        # Exact (erf) GELU, in the pattern ORT's optimizer fuses into one Gelu node.
        inner = g.linear(x, f"{p}.intermediate.dense")
        gelu = g.op("Mul", [g.op("Mul", [inner, g.op("Add", [g.op("Erf", [g.op("Div", [inner, sqrt2])]), one])]), half])
        out = g.op("Add", [g.linear(gelu, f"{p}.output.dense"), x])
        x = g.layer_norm(out, f"{p}.output.LayerNorm", config.layer_norm_eps)

    g.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME], name="output"))
    dims = ["batch", "sequence"]
    graph = helper.make_graph(
        g.nodes,
        name,
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in INPUT_NAMES],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [*dims, hidden])],
        initializer=g.initializers,
    )
    model = helper.make_model(graph, producer_name="edgefleet", opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # what onnxruntime 1.14 and later load
    onnx.checker.check_model(model, full_check=True)
    return model


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def reference_forward(
    config: BertConfig,
    weights: dict[str, np.ndarray],
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    token_type_ids: np.ndarray,
) -> np.ndarray:
    """The encoder in float64 numpy: the ground truth an exported graph is checked against."""
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype.kind == "f"}

    def linear(x: np.ndarray, prefix: str) -> np.ndarray:
        return x @ w[f"{prefix}.weight"].T + w[f"{prefix}.bias"]

    eps = config.layer_norm_eps
    seq = input_ids.shape[1]
    x = (
        w["embeddings.word_embeddings.weight"][input_ids]
        + w["embeddings.token_type_embeddings.weight"][token_type_ids]
        + w["embeddings.position_embeddings.weight"][:seq]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    mask = (1.0 - attention_mask[:, None, None, :].astype(np.float64)) * _MASKED_SCORE
    batch, heads, size = input_ids.shape[0], config.num_attention_heads, config.head_size
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}"

        def split(t: np.ndarray) -> np.ndarray:
            return t.reshape(batch, seq, heads, size).transpose(0, 2, 1, 3)

        q, k, v = (split(linear(x, f"{p}.attention.self.{n}")) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(size) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        context = (scores / scores.sum(-1, keepdims=True)) @ v
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq, config.hidden_size)
        x = _layer_norm(
            linear(context, f"{p}.attention.output.dense") + x, *_ln(w, f"{p}.attention.output.LayerNorm"), eps
        )
        inner = linear(x, f"{p}.intermediate.dense")
        gelu = 0.5 * inner * (1.0 + _erf(inner / math.sqrt(2.0)))
        x = _layer_norm(linear(gelu, f"{p}.output.dense") + x, *_ln(w, f"{p}.output.LayerNorm"), eps)
    return x


def _ln(w: dict[str, np.ndarray], prefix: str) -> tuple[np.ndarray, np.ndarray]:
    return w[f"{prefix}.weight"], w[f"{prefix}.bias"]


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray, *, normalize: bool = True) -> np.ndarray:
    """Sentence embeddings: the mean over real tokens, L2-normalized as sentence-transformers does."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    pooled = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    if normalize:
        pooled = pooled / np.clip(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12, None)
    return pooled


def export_checkpoint(directory: Path, out: Path) -> BertConfig:
    """``config.json`` + ``model.safetensors`` in ``directory`` -> an fp32 ONNX file at ``out``."""
    config = BertConfig.from_file(directory / "config.json")
    model = build_bert_onnx(config, load_weights(directory / "model.safetensors"), name=directory.name or "bert")
    onnx.save_model(model, str(out))
    return config


def verify(directory: Path, sentences: list[str], *, reference_onnx: Path | None = None) -> dict[str, float]:
    """Export ``directory`` and compare its sentence embeddings with the numpy forward pass
    (and with another export, e.g. an int8 one, when given): min and mean cosine of each."""
    import tempfile

    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(256)
    encodings = tokenizer.encode_batch(sentences)
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], np.int64),
    }
    mask = feeds["attention_mask"]
    with tempfile.TemporaryDirectory() as tmp:
        config = export_checkpoint(directory, Path(tmp) / "model.onnx")
        session = ort.InferenceSession(str(Path(tmp) / "model.onnx"), providers=["CPUExecutionProvider"])
        ours = mean_pool(session.run([OUTPUT_NAME], feeds)[0], mask)
    others = {"numpy": reference_forward(config, load_weights(directory / "model.safetensors"), **feeds)}
    if reference_onnx is not None:
        other = ort.InferenceSession(str(reference_onnx), providers=["CPUExecutionProvider"])
        others[reference_onnx.name] = other.run(None, {i.name: feeds[i.name] for i in other.get_inputs()})[0]
    result = {}
    for name, hidden in others.items():
        cosine = (ours * mean_pool(hidden, mask)).sum(-1)
        result[f"min cosine vs {name}"] = float(cosine.min())
        result[f"mean cosine vs {name}"] = float(cosine.mean())
    return result


if __name__ == "__main__":
    import argparse

    from fleet.lib.evaluation import default_sentences

    parser = argparse.ArgumentParser(description="Export a BERT checkpoint and check it against numpy.")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--reference", type=Path, help="another ONNX export to compare with")
    args = parser.parse_args()
    for key, value in verify(args.directory, default_sentences(), reference_onnx=args.reference).items():
        print(f"{key}: {value:.7f}")
