"""Is an uploaded file an ONNX model this plane's onnxruntime can load, and what is its signature?

No Django here. ``inspect_onnx`` reads the graph without external data, checks it with
``onnx.checker`` and compares its default-domain opset with the range onnxruntime loads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

# onnxruntime loads models from opset 7 on; the upper end is probed (see supported_opsets).
_MIN_OPSET = 7
_PROBE_UP_TO = 40


class InvalidModel(ValueError):
    """A file that is not a loadable ONNX model; the text says why, for the uploader."""


@dataclass(frozen=True)
class OnnxInfo:
    signature: dict
    opset: int


def _probe_loads(opset: int) -> bool:
    import onnxruntime as ort

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


@functools.cache
def supported_opsets() -> tuple[int, int]:
    """The default-domain opsets this process's onnxruntime loads, as (lowest, highest).

    Probed once with a one-node graph: onnxruntime has no API that tells.
    """
    highest = _MIN_OPSET
    for opset in range(_MIN_OPSET, _PROBE_UP_TO + 1):
        if not _probe_loads(opset):
            break
        highest = opset
    return _MIN_OPSET, highest


def _value_info(value: onnx.ValueInfoProto) -> dict:
    tensor = value.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tensor.shape.dim]
    return {"name": value.name, "dtype": TensorProto.DataType.Name(tensor.elem_type).lower(), "shape": shape}


def signature_of(model: onnx.ModelProto) -> dict:
    """Inputs (less initializers) and outputs, each with name, dtype and shape."""
    initializers = {i.name for i in model.graph.initializer}
    return {
        "inputs": [_value_info(v) for v in model.graph.input if v.name not in initializers],
        "outputs": [_value_info(v) for v in model.graph.output],
    }


def _has_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def inspect_onnx(path: Path) -> OnnxInfo:
    """The model's signature and opset, or ``InvalidModel`` saying what is wrong."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidModel(f"the file is not an ONNX model, or it is truncated ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise InvalidModel("the file is not an ONNX model: it has no graph")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise InvalidModel("the ONNX model imports no default-domain opset")
    lowest, highest = supported_opsets()
    if not lowest <= opset <= highest:
        raise InvalidModel(f"the model uses opset {opset}; this plane's onnxruntime loads opsets {lowest} to {highest}")
    # After the opset check: the checker rejects opsets newer than onnx knows, less clearly.
    try:
        # With external weights (a generative bundle's model.onnx.data), the checker is given
        # the path, so it looks for the data file beside the model, not in the working directory.
        onnx.checker.check_model(str(path) if _has_external_data(model) else model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModel(f"the ONNX model is not valid: {first[:300]}") from None
    return OnnxInfo(signature=signature_of(model), opset=opset)
