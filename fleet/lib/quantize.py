"""Variants of an fp32 ONNX model: int8 dynamic, int4 weight-only, fp16. No Django here.

Each function writes ``dst`` and returns the recipe that made it: the tool, its version
and the parameters, so a variant can be rebuilt and its lineage read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx


@contextmanager
def quiet_onnxruntime_logging() -> Iterator[None]:
    """Silence ORT's quantizers, which log at INFO and may call ``logging.basicConfig``.

    Warnings go too: the only one they give is advice to pre-process the model first.

    The root logger's handlers and level are put back afterwards, so a worker or the
    bridge keeps its own logging configuration.
    """
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    previous_disable = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous_disable)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def quantize_int8(src: Path, dst: Path, *, per_channel: bool = True, reduce_range: bool = True) -> dict:
    """Dynamic int8: weights quantized ahead of time, activations at run time.

    ``reduce_range`` keeps weights to 7 bits: on CPUs without VNNI the u8*s8 products
    saturate otherwise (MiniLM's cosine drops to about 0.93 on an AVX2-only CPU).
    """
    with quiet_onnxruntime_logging():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, dst, per_channel=per_channel, reduce_range=reduce_range, weight_type=QuantType.QInt8)
    return {
        "tool": "onnxruntime.quantization.quantize_dynamic",
        "tool_version": _ort_version(),
        "parameters": {"per_channel": per_channel, "reduce_range": reduce_range, "weight_type": "QInt8"},
    }


def quantize_int4(
    src: Path, dst: Path, *, block_size: int = 32, is_symmetric: bool = False, accuracy_level: int | None = None
) -> dict:
    """Weight-only int4 of every MatMul with a constant weight, in blocks of ``block_size``.

    Asymmetric by default: on MiniLM it keeps a little more quality than symmetric (0.976 vs 0.972).
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two of at least 16, not {block_size}")
    with quiet_onnxruntime_logging():
        # Imported here: the module imports onnx_ir and calls logging.basicConfig(INFO).
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)), block_size=block_size, is_symmetric=is_symmetric, accuracy_level=accuracy_level
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return {
        "tool": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "tool_version": _ort_version(),
        "parameters": {
            "bits": 4,
            "block_size": block_size,
            "is_symmetric": is_symmetric,
            "accuracy_level": accuracy_level,
        },
    }


def convert_fp16(src: Path, dst: Path) -> dict:
    """Half-precision weights and compute, with fp32 inputs and outputs kept for callers."""
    with quiet_onnxruntime_logging():
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    onnx.save_model(model, str(dst))
    return {
        "tool": "onnxruntime.transformers.float16.convert_float_to_float16",
        "tool_version": _ort_version(),
        "parameters": {"keep_io_types": True},
    }
