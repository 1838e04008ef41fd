"""A plain numpy forward pass of a llama GGUF over its dequantized weights.

It is the yardstick for the converted graphs: no cache, no fused operators, no ONNX;
the rotary embedding is applied the way llama.cpp applies it to the stored (permuted)
rows, so it also checks that the converter undid the permutation correctly.
"""

from __future__ import annotations

import numpy as np

from .reader import GGUFModel


class NumpyLlama:
    """Greedy decoding with numpy, for small models (it recomputes the whole sequence each step)."""

    def __init__(self, model: GGUFModel) -> None:
        self.model = model
        self.c = model.config
        self._cache: dict[str, np.ndarray] = {}

    def w(self, name: str) -> np.ndarray:
        if name not in self._cache:
            self._cache[name] = self.model.dequantized(name)
        return self._cache[name]

    def _rms(self, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + self.c.rms_eps) * weight

    def _rope_interleaved(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """llama.cpp's rotation of adjacent pairs (x[2i], x[2i+1]), on (tokens, heads, head size)."""
        hs = x.shape[-1]
        inv_freq = 1.0 / (self.c.rope_theta ** (np.arange(0, hs, 2, dtype=np.float64) / hs))
        angles = np.outer(positions, inv_freq)[:, None, :]
        cos, sin = np.cos(angles), np.sin(angles)
        even, odd = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = even * sin + odd * cos
        return out

    def logits(self, ids: list[int]) -> np.ndarray:
        c = self.c
        n, hs = len(ids), c.head_size
        x = self.w("token_embd.weight")[np.asarray(ids)].astype(np.float64)
        positions = np.arange(n)
        causal = np.triu(np.full((n, n), -np.inf), 1)
        group = c.num_heads // c.num_kv_heads
        for i in range(c.num_layers):
            p = f"blk.{i}"
            h = self._rms(x, self.w(f"{p}.attn_norm.weight"))
            q = self._rope_interleaved((h @ self.w(f"{p}.attn_q.weight").T).reshape(n, c.num_heads, hs), positions)
            k = self._rope_interleaved((h @ self.w(f"{p}.attn_k.weight").T).reshape(n, c.num_kv_heads, hs), positions)
            v = (h @ self.w(f"{p}.attn_v.weight").T).reshape(n, c.num_kv_heads, hs)
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hs) + causal
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            scores /= scores.sum(-1, keepdims=True)
            attn = np.einsum("hqk,khd->qhd", scores, v).reshape(n, c.hidden_size)
            x = x + attn @ self.w(f"{p}.attn_output.weight").T
            h = self._rms(x, self.w(f"{p}.ffn_norm.weight"))
            gate = h @ self.w(f"{p}.ffn_gate.weight").T
            up = h @ self.w(f"{p}.ffn_up.weight").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ self.w(f"{p}.ffn_down.weight").T
        x = self._rms(x, self.w("output_norm.weight"))
        return x @ self.w(self.model.lm_head_name()).T

    def greedy(self, ids: list[int], n_tokens: int) -> list[int]:
        ids = list(ids)
        out: list[int] = []
        for _ in range(n_tokens):
            token = int(np.argmax(self.logits(ids)[-1]))
            out.append(token)
            ids.append(token)
        return out
