"""Is an uploaded file an ONNX model this plane's onnxruntime can load, and what is its signature?

No Django here. ``inspect_onnx`` reads the graph without external data, refuses a model
that keeps tensors in external files (an upload is one file, and a reference such as
``../x`` or another stored artifact's name must never be followed), checks it with
``onnx.checker`` and compares its default-domain opset with the range onnxruntime loads.
It takes about twice the file's size in memory: the plane runs it in the worker, never in
a web request.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
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


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor of the graph: initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def _external_location(model: onnx.ModelProto) -> tuple[str, str] | None:
    """(tensor name, file) of the first tensor whose data lives outside the model file."""
    for tensor in _tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            where = {entry.key: entry.value for entry in tensor.external_data}
            return tensor.name, where.get("location", "")
    return None


def inspect_onnx(path: Path, *, allow_external_data: bool = False) -> OnnxInfo:
    """The model's signature and opset, or ``InvalidModel`` saying what is wrong.

    ``allow_external_data`` is for files the plane wrote itself (a generative bundle's
    model.onnx beside its model.onnx.data): the reference must still name a plain file
    beside the model, never a path.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InvalidModel(f"the file is not an ONNX model, or it is truncated ({type(exc).__name__})") from None
    if not model.graph.node and not model.graph.output:
        raise InvalidModel("the file is not an ONNX model: it has no graph")
    external = _external_location(model)
    if external is not None and allow_external_data:
        for tensor in _tensors(model.graph):
            location = {e.key: e.value for e in tensor.external_data}.get("location", "")
            if tensor.data_location == TensorProto.EXTERNAL and (
                Path(location).name != location or location in ("", ".", "..")
            ):
                raise InvalidModel(
                    f"tensor {tensor.name!r} keeps its data in {location!r}, not in a file beside the model"
                )
    elif external is not None:
        raise InvalidModel(
            f"the model keeps tensor {external[0]!r} in an external file ({external[1]!r}); upload one file that "
            "holds its weights (onnx.save(model, path, save_as_external_data=False))"
        )
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise InvalidModel("the ONNX model imports no default-domain opset")
    lowest, highest = supported_opsets()
    if not lowest <= opset <= highest:
        raise InvalidModel(f"the model uses opset {opset}; this plane's onnxruntime loads opsets {lowest} to {highest}")
    signature = signature_of(model)
    # The checker reads the file itself: handing it the parsed model would serialize a copy.
    del model
    # After the opset check: the checker rejects opsets newer than onnx knows, less clearly.
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InvalidModel(f"the ONNX model is not valid: {first[:300]}") from None
    return OnnxInfo(signature=signature, opset=opset)
