"""A llama decoder as an ONNX graph with a KV cache, in onnxruntime-genai's conventions.

Inputs ``input_ids`` and ``attention_mask`` (int64, batch x tokens) and, per layer,
``past_key_values.{i}.key``/``.value`` (batch, kv heads, past tokens, head size); outputs
``logits`` (batch, tokens, vocab) and ``present.{i}.key``/``.value``. These are the names
onnxruntime-genai's model builder writes into ``genai_config.json`` (builders/base.py).

Attention is ``com.microsoft.GroupQueryAttention`` with rotary embedding inside it, fed
``seqlens_k`` (tokens in the mask minus one) and ``total_sequence_length``, as the builder's
graphs do; RMSNorm is SkipSimplifiedLayerNormalization (the first one in standard ops).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from .quant import BLOCK, NBits, concat_rows

OPSET = 21
MS_OPSET = 1
# Tensors smaller than this stay inside model.onnx; the rest go to model.onnx.data.
_INLINE_LIMIT = 1024
_ALIGN = 4096


class ExternalData:
    """Writes initializers straight to the ``.data`` file, so a graph never holds its weights."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.initializers: list[TensorProto] = []
        self._names: set[str] = set()

    def add(self, name: str, array: np.ndarray) -> str:
        if name in self._names:
            return name
        self._names.add(name)
        array = np.ascontiguousarray(array)
        if array.nbytes < _INLINE_LIMIT:
            self.initializers.append(onnx.numpy_helper.from_array(array, name))
            return name
        offset = self.file.tell()
        pad = (-offset) % _ALIGN
        if pad:
            self.file.write(b"\0" * pad)
            offset += pad
        self.file.write(array.tobytes())
        tensor = TensorProto(
            name=name, dims=list(array.shape), data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        )
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return name

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()


class DecoderGraph:
    """Accumulates nodes; ``linear`` picks MatMul, MatMulNBits or MatMulNBits plus Q4_1's offset."""

    def __init__(self, data: ExternalData, *, accuracy_level: int = 4) -> None:
        self.data = data
        self.nodes: list[onnx.NodeProto] = []
        self.accuracy_level = accuracy_level
        self._blocksums: dict[str, str] = {}
        self._count = 0

    def node(self, op: str, inputs: list[str], n_out: int = 1, *, domain: str = "", **attrs) -> list[str]:
        self._count += 1
        name = f"/{op}_{self._count}"
        outputs = [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def const(self, name: str, array: np.ndarray) -> str:
        return self.data.add(name, array)

    def linear(self, x: str, weight: np.ndarray | NBits, name: str) -> str:
        if isinstance(weight, np.ndarray):
            w = self.const(f"{name}.weight_t", np.ascontiguousarray(weight.T))
            return self.node("MatMul", [x, w])[0]
        inputs = [x, self.const(f"{name}.codes", weight.codes), self.const(f"{name}.scales", weight.scales)]
        if weight.zero_points is not None:
            inputs.append(self.const(f"{name}.zero_points", weight.zero_points))
        (y,) = self.node(
            "MatMulNBits",
            inputs,
            domain="com.microsoft",
            K=weight.k,
            N=weight.n,
            bits=weight.bits,
            block_size=BLOCK,
            accuracy_level=self.accuracy_level,
        )
        if weight.mins is None:
            return y
        mins = self.const(f"{name}.mins_t", np.ascontiguousarray(weight.mins.T))
        offset = self.node("MatMul", [self.blocksum(x, weight.k), mins])[0]
        return self.node("Add", [y, offset])[0]

    def blocksum(self, x: str, k: int) -> str:
        """Sum of each block of 32 inputs, shared by every Q4_1 weight that reads ``x``."""
        if x not in self._blocksums:
            shape = self.const(f"blocksum_shape_{k}", np.array([0, 0, k // BLOCK, BLOCK], dtype=np.int64))
            blocks = self.node("Reshape", [x, shape])[0]
            axes = self.const("axes_last", np.array([-1], dtype=np.int64))
            self._blocksums[x] = self.node("ReduceSum", [blocks, axes], keepdims=0)[0]
        return self._blocksums[x]


def _linears(g: DecoderGraph, x: str, weights, prefix: str, names: tuple[str, ...]) -> list[str]:
    """The linear layers that share an input, as one MatMul when their weights are packed alike:
    one kernel call instead of several is a good part of a decode step on a model this small.
    Otherwise (say a Q4_1 query beside a Q6_K value) one output each."""
    parts = [weights(f"{prefix}.{name}.weight") for name in names]
    try:
        fused = concat_rows(parts)
    except ValueError:
        return [g.linear(x, w, f"{prefix}.{name}") for w, name in zip(parts, names, strict=True)]
    return [g.linear(x, fused, f"{prefix}.{'_'.join(names)}")]


def rope_caches(context_length: int, head_size: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 1.0 / (theta ** (np.arange(0, head_size, 2, dtype=np.float64) / head_size))
    angles = np.outer(np.arange(context_length, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_decoder(
    config,
    weights: Callable[[str], np.ndarray | NBits],
    embedding: np.ndarray | NBits,
    out_dir: Path,
    *,
    progress: Callable[[int, int, str], None] | None = None,
    context_length: int | None = None,
    accuracy_level: int = 4,
) -> Path:
    """Write ``model.onnx`` and ``model.onnx.data`` into ``out_dir``.

    ``weights(name)`` gives each linear weight (``blk.{i}.attn_q.weight`` …, ``output.weight``)
    as float32 (N, K) or packed, and each norm weight as float32; ``embedding`` is the token
    table (vocab, hidden), float32 or 8-bit.
    """
    c = config
    ctx = context_length or c.context_length
    data = ExternalData(out_dir / "model.onnx.data")
    g = DecoderGraph(data, accuracy_level=accuracy_level)
    hs, kvh = c.head_size, c.num_kv_heads

    seqlens = g.node("ReduceSum", ["attention_mask", g.const("axes_1", np.array([1], dtype=np.int64))], keepdims=0)[0]
    seqlens = g.node("Sub", [seqlens, g.const("one_i64", np.array(1, dtype=np.int64))])[0]
    seqlens_k = g.node("Cast", [seqlens], to=TensorProto.INT32)[0]
    mask_shape = g.node("Shape", ["attention_mask"])[0]
    total = g.node("Gather", [mask_shape, g.const("index_1", np.array(1, dtype=np.int64))], axis=0)[0]
    total_len = g.node("Cast", [total], to=TensorProto.INT32)[0]
    cos, sin = rope_caches(ctx, hs, c.rope_theta)
    cos_name, sin_name = g.const("cos_cache", cos), g.const("sin_cache", sin)

    if isinstance(embedding, np.ndarray):
        residual = g.node("Gather", [g.const("embed_tokens.weight", embedding), "input_ids"], axis=0)[0]
    else:
        table = embedding.codes.reshape(embedding.n, embedding.k)
        assert embedding.zero_points is not None  # GatherBlockQuantized takes them; repacks keep them
        residual = g.node(
            "GatherBlockQuantized",
            [
                g.const("embed_tokens.codes", table),
                "input_ids",
                g.const("embed_tokens.scales", embedding.scales),
                g.const("embed_tokens.zero_points", embedding.zero_points),
            ],
            domain="com.microsoft",
            bits=embedding.bits,
            block_size=BLOCK,
            gather_axis=0,
            quantize_axis=1,
        )[0]
    eps = float(c.rms_eps)
    # The first RMSNorm in standard operators (once per call, so its cost is nil): the fused
    # SimplifiedLayerNormalization is onnxruntime's own op in the default domain, which the
    # onnx checker, and so the registry's upload check, does not know.
    square = g.node("Mul", [residual, residual])[0]
    mean = g.node("ReduceMean", [square, g.const("axes_last", np.array([-1], dtype=np.int64))], keepdims=1)[0]
    std = g.node("Sqrt", [g.node("Add", [mean, g.const("rms_eps", np.array(eps, dtype=np.float32))])[0]])[0]
    scaled = g.node("Div", [residual, std])[0]
    normed = g.node("Mul", [scaled, g.const("blk.0.attn_norm", _dense(weights("blk.0.attn_norm.weight")))])[0]

    past_inputs, present_outputs = [], []
    for i in range(c.num_layers):
        if progress:
            progress(i, c.num_layers, f"layer {i + 1}/{c.num_layers}")
        p = f"blk.{i}"
        qkv = _linears(g, normed, weights, p, ("attn_q", "attn_k", "attn_v"))
        qkv_inputs = [qkv[0], "", ""] if len(qkv) == 1 else qkv
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        past_inputs += [past_k, past_v]
        present_outputs += [present_k, present_v]
        attn = f"/{p}/attn"
        g.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                # Packed: Q, K and V come from one MatMul, and GQA splits them (key and value empty).
                [*qkv_inputs, past_k, past_v, seqlens_k, total_len, cos_name, sin_name],
                [attn, present_k, present_v],
                name=f"/{p}/GroupQueryAttention",
                domain="com.microsoft",
                num_heads=c.num_heads,
                kv_num_heads=kvh,
                scale=float(1.0 / np.sqrt(hs)),
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        o = g.linear(attn, weights(f"{p}.attn_output.weight"), f"{p}.attn_output")
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [o, residual, g.const(f"{p}.ffn_norm", _dense(weights(f"{p}.ffn_norm.weight")))],
            4,
            domain="com.microsoft",
            epsilon=eps,
        )
        gate_up = _linears(g, normed, weights, p, ("ffn_gate", "ffn_up"))
        gate, up = g.node("Split", gate_up, 2, axis=-1, num_outputs=2) if len(gate_up) == 1 else gate_up
        silu = g.node("Mul", [gate, g.node("Sigmoid", [gate])[0]])[0]
        down = g.linear(g.node("Mul", [silu, up])[0], weights(f"{p}.ffn_down.weight"), f"{p}.ffn_down")
        last = i == c.num_layers - 1
        next_norm = "output_norm.weight" if last else f"blk.{i + 1}.attn_norm.weight"
        normed, _, _, residual = g.node(
            "SkipSimplifiedLayerNormalization",
            [down, residual, g.const(next_norm.removesuffix(".weight"), _dense(weights(next_norm)))],
            4,
            domain="com.microsoft",
            epsilon=eps,
        )
    lm_head = weights("output.weight")
    if isinstance(lm_head, np.ndarray):
        # The tied table is used as is (Gemm transB), not copied transposed: 113 MB for SmolLM2.
        flat = g.node("Reshape", [normed, g.const("shape_flat", np.array([-1, c.hidden_size], dtype=np.int64))])[0]
        head = "embed_tokens.weight" if lm_head is embedding else g.const("lm_head.weight", lm_head)
        scores = g.node("Gemm", [flat, head], transB=1)[0]
        ids_shape = g.node("Shape", ["input_ids"])[0]
        out_shape = g.node(
            "Concat", [ids_shape, g.const("vocab_dim", np.array([c.vocab_size], dtype=np.int64))], axis=0
        )[0]
        g.nodes.append(helper.make_node("Reshape", [scores, out_shape], ["logits"], name="/lm_head/Reshape"))
    else:
        scores = g.linear(normed, lm_head, "lm_head")
        g.nodes.append(helper.make_node("Identity", [scores], ["logits"], name="/lm_head/Identity"))
    data.close()
    if progress:
        progress(c.num_layers, c.num_layers, "writing model.onnx")

    cache_in = ["batch_size", kvh, "past_sequence_length", hs]
    cache_out = ["batch_size", kvh, "total_sequence_length", hs]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
    ] + [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_in) for name in past_inputs]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", c.vocab_size])
    ] + [helper.make_tensor_value_info(name, TensorProto.FLOAT, cache_out) for name in present_outputs]
    graph = helper.make_graph(g.nodes, "decoder", inputs, outputs, initializer=data.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", MS_OPSET)],
        producer_name="edgefleet.gguf",
    )
    model.ir_version = 10
    path = out_dir / "model.onnx"
    onnx.save(model, path)
    return path


def _dense(weight: np.ndarray | NBits) -> np.ndarray:
    """A norm's weight: always kept as floats, never packed."""
    assert isinstance(weight, np.ndarray), "norm weights are never quantized"
    return weight
