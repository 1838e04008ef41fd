"""A fake token engine for fast tests of the generative path, and the real SmolLM2 bundle when it is cached."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.contract import wire
from agent.generate import ChatMessage, LoadedGenerator, Sampling
from agent.runtime import ModelInfo

EOS = 0
WORDS = ["<eos>", " The", " capital", " of", " France", " is", " Paris", ".", " STOP", " and"]
PARIS = [1, 2, 3, 4, 5, 6, 7, EOS]  # " The capital of France is Paris."
GENERATE_SPEC = wire.InferenceSpec(task="generate")
INFO = ModelInfo(deployment_id=9, sha256="d" * 64, model="tiny-lm", version="1.0.0")
CACHE = Path(os.environ.get("EDGEFLEET_CACHE", Path.home() / ".cache" / "edgefleet"))
SMOLLM2_BUNDLES = CACHE / "models" / "smollm2-onnx"
SMOLLM2_GGUF = CACHE / "models" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REPO = Path(__file__).resolve().parents[2]


class FakeEngine:
    """Speaks ``script`` (then " and" forever), one token per ``delay`` seconds, and counts what it made."""

    def __init__(
        self,
        script: Sequence[int] = PARIS,
        *,
        delay: float = 0.0,
        context_length: int = 64,
        fail_after: int | None = None,
    ) -> None:
        self.script = list(script)
        self.fail_after = fail_after
        self.delay = delay
        self.context_length = context_length
        self.eos_token_ids = frozenset({EOS})
        self.produced = 0
        self.running = 0
        self.prompts: list[list[int]] = []
        self.samplings: list[Sampling] = []
        self._lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        return [len(word) % 9 + 1 for word in text.split()]

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"

    def tokens(self, prompt_ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        with self._lock:
            self.prompts.append(list(prompt_ids))
            self.samplings.append(sampling)
            self.running += 1
        try:
            for index in range(sampling.max_tokens):
                if index == self.fail_after:
                    raise RuntimeError("the model's kernel failed")
                if self.delay:
                    time.sleep(self.delay)
                with self._lock:
                    self.produced += 1
                yield self.script[index] if index < len(self.script) else 9
        finally:
            with self._lock:
                self.running -= 1

    def detokenizer(self) -> Callable[[int], str]:
        return lambda token: WORDS[token]


def fake_generator(engine: FakeEngine | None = None, info: ModelInfo = INFO) -> LoadedGenerator:
    return LoadedGenerator(engine or FakeEngine(), GENERATE_SPEC, info)


@functools.cache
def smollm2_bundle() -> Path | None:
    """SmolLM2-135M's int4 bundle (the variant that answers "Paris"), converted from the cached GGUF
    unless the cache holds one this converter made (``--if-stale``: keyed by its version and packages).

    The GGUF converter (fleet.lib.gguf.convert) runs in a subprocess, so these agent tests
    import nothing of the plane; without it or the GGUF (make models), a cached bundle is
    taken as it is, and without one there is no bundle.
    """
    int4 = SMOLLM2_BUNDLES / "int4"
    if not (SMOLLM2_GGUF.exists() and (REPO / "fleet" / "lib" / "gguf" / "convert.py").exists()):
        return int4 if (int4 / "genai_config.json").exists() else None
    convert = [sys.executable, "-m", "fleet.lib.gguf.convert", str(SMOLLM2_GGUF), str(int4), "--variant", "int4"]
    done = subprocess.run([*convert, "--if-stale"], cwd=REPO, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"converting SmolLM2 failed: {done.stderr[-2000:]}")
    return int4


class CountingEngine:
    """A real engine, with the tokens it generated and the generations running counted: to see one stop."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.context_length = engine.context_length
        self.eos_token_ids = engine.eos_token_ids
        self.produced = 0
        self.running = 0

    def encode(self, text: str) -> list[int]:
        return list(self.engine.encode(text))

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        return str(self.engine.render_chat(messages))

    def tokens(self, prompt_ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        self.running += 1
        try:
            for token in self.engine.tokens(prompt_ids, sampling):
                self.produced += 1
                yield token
        finally:
            self.running -= 1

    def detokenizer(self) -> Callable[[int], str]:
        return self.engine.detokenizer()  # type: ignore[no-any-return]
