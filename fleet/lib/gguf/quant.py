"""Weights in ``com.microsoft.MatMulNBits`` form, from GGUF blocks or from float32.

MatMulNBits stores, for a weight of N outputs and K inputs, blocks of 32 values along K:
``codes`` (N, K/32, 32*bits/8) with element 2i in the low nibble and 2i+1 in the high one
(4 bits), ``scales`` (N, K/32) and ``zero_points``; a value is ``(code - zero) * scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass
class NBits:
    """One weight packed for MatMulNBits, with the optional per-block offset of Q4_1."""

    bits: int
    codes: np.ndarray  # (N, K/32, blob) uint8
    scales: np.ndarray  # (N, K/32) float32
    zero_points: np.ndarray | None  # 4 bits: (N, ceil(K/64)) packed; 8 bits: (N, K/32)
    mins: np.ndarray | None = None  # (N, K/32) float32: Q4_1's block minimum, added as blocksum(x) · mins

    @property
    def n(self) -> int:
        return int(self.codes.shape[0])

    @property
    def k(self) -> int:
        return int(self.codes.shape[1] * BLOCK)

    def dequantize(self) -> np.ndarray:
        """The float32 weight (N, K) these codes stand for, for tests and evaluation."""
        n, nb = self.scales.shape
        if self.bits == 4:
            codes = _unpack4(self.codes).astype(np.float32)
            zero = _unpack_zero4(self.zero_points, nb) if self.zero_points is not None else np.full((n, nb), 8.0)
        else:
            codes = self.codes.astype(np.float32)
            zero = self.zero_points.astype(np.float32) if self.zero_points is not None else np.full((n, nb), 128.0)
        w = (codes - zero[..., None]) * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(n, nb * BLOCK).astype(np.float32)


def _pack4(q: np.ndarray) -> np.ndarray:
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray) -> np.ndarray:
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def _pack_zero4(zero: np.ndarray) -> np.ndarray:
    n, nb = zero.shape
    if nb % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), dtype=zero.dtype)], axis=1)
    return _pack4(zero.astype(np.uint8))


def _unpack_zero4(packed: np.ndarray, nb: int) -> np.ndarray:
    return _unpack4(packed)[:, :nb].astype(np.float32)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def repack_q4_1(rows: np.ndarray) -> NBits:
    """GGUF Q4_1 rows (N, K/32*20 bytes) to MatMulNBits without loss.

    A Q4_1 block is ``d`` (f16), ``m`` (f16) and 16 bytes of codes: the low nibbles are
    elements 0-15, the high nibbles 16-31; a value is ``d*q + m``. MatMulNBits has no
    per-block offset, so the codes go in with its default zero point 8 and ``m + 8d`` is
    returned as ``mins`` for the graph to add as ``blocksum(x) · (m + 8d)``.

    Zero point 8 rather than 0: with ``accuracy_level=4`` the activations are rounded to
    int8, and codes centred on zero keep that rounding's error about half as large (measured
    on SmolLM2's ffn_up: 0.5% of the largest output instead of 1.1%).
    """
    n = rows.shape[0]
    blocks = rows.reshape(n, -1, 20)
    d, m, qs = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]), blocks[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return NBits(4, _pack4(q), d, None, mins=(m.astype(np.float64) + 8.0 * d).astype(np.float32))


def repack_q8_0(rows: np.ndarray) -> NBits:
    """GGUF Q8_0 rows (N, K/32*34 bytes) to 8-bit MatMulNBits without loss: ``d * q``, q signed."""
    n = rows.shape[0]
    blocks = rows.reshape(n, -1, 34)
    d = _f16(blocks[..., 0:2])
    q = blocks[..., 2:].view(np.int8).astype(np.int16) + 128
    return NBits(8, q.astype(np.uint8), d, np.full(d.shape, 128, dtype=np.uint8))


def rtn_int4(w: np.ndarray) -> NBits:
    """Round-to-nearest asymmetric 4 bits, block 32, from a float32 weight (N, K)."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = (hi - lo) / 15.0
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(-lo / scale), 0, 15)
    q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return NBits(4, _pack4(q), scale.astype(np.float32), _pack_zero4(zero.astype(np.uint8)))


def rtn_int8(w: np.ndarray) -> NBits:
    """Round-to-nearest symmetric 8 bits, block 32, from a float32 weight (N, K)."""
    n, k = w.shape
    blocks = w.reshape(n, k // BLOCK, BLOCK)
    scale = np.abs(blocks).max(axis=-1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.round(blocks / scale[..., None]), -127, 127) + 128
    return NBits(8, q.astype(np.uint8), scale.astype(np.float32), np.full(scale.shape, 128, dtype=np.uint8))


def concat_rows(weights: list[np.ndarray | NBits]) -> np.ndarray | NBits:
    """Weights that read the same input, stacked along their outputs, so one MatMul computes all.

    Packed weights concatenate row-wise as they are (a row's blocks, scales and zero points
    are its own); they must share bits and the presence of zero points and minimums.
    """
    first = weights[0]
    if isinstance(first, np.ndarray):
        return np.concatenate([w for w in weights if isinstance(w, np.ndarray)], axis=0)
    packed = [w for w in weights if isinstance(w, NBits)]
    if len(packed) != len(weights) or len({(w.bits, w.zero_points is None, w.mins is None) for w in packed}) != 1:
        raise ValueError("only weights packed alike concatenate")

    def stack(arrays):
        return None if arrays[0] is None else np.concatenate(arrays, axis=0)

    return NBits(
        first.bits,
        stack([w.codes for w in packed]),
        stack([w.scales for w in packed]),
        stack([w.zero_points for w in packed]),
        stack([w.mins for w in packed]),
    )
