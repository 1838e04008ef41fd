"""Generative models: a decoder bundle run token by token with onnxruntime-genai.

A LoadedGenerator is the generative counterpart of runtime.LoadedModel: immutable
once built, shared by every request, each request with its own generation. It
stands on a TokenEngine, onnxruntime-genai's model and tokenizer in production
(OgEngine) and a fake in fast tests, so the HTTP path, stop strings, cancellation
and telemetry are tested without a real model.

A generation is an iterator of text pieces. The caller stops it by no longer
iterating (``close()``): the engine's generator, and with it the KV cache, goes
at once, so a client that disconnects mid-stream costs no more tokens.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import msgspec

from agent.contract import wire

if TYPE_CHECKING:
    from agent.runtime import ModelInfo

# onnxruntime_genai is imported when the first generative model loads, like onnxruntime.

log = logging.getLogger(__name__)

ROLES: Final = frozenset({"system", "user", "assistant", "developer", "tool"})
MAX_STOP_STRINGS: Final = 4
FinishReason = Literal["stop", "length"]


class GenerateError(ValueError):
    """A chat request the model cannot take (bad messages, prompt too long). The text says why."""


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens: temperature 0 is greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class TokenEngine(Protocol):
    """What a LoadedGenerator needs of its runtime."""

    context_length: int
    eos_token_ids: frozenset[int]

    def encode(self, text: str) -> list[int]: ...

    def render_chat(self, messages: Sequence[ChatMessage]) -> str: ...

    def tokens(self, prompt_ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        """Generated token ids, EOS included, until EOS or ``sampling.max_tokens``."""
        ...

    def detokenizer(self) -> Callable[[int], str]:
        """A fresh streaming decoder: each token id in, the text it completes out (maybe empty)."""
        ...


class Generation:
    """One chat completion in progress: iterate it for text pieces, then read how it ended.

    Timing starts at ``started`` (the request's arrival, so queueing counts in the
    time to first token) and is read with ``clock``.
    """

    def __init__(
        self,
        engine: TokenEngine,
        prompt_ids: list[int],
        sampling: Sampling,
        stop: Sequence[str],
        *,
        started: float,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.started = started
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self._engine = engine
        self._prompt_ids = prompt_ids
        self._sampling = sampling
        self._stops = StopMatcher(stop)
        self._clock = clock
        self._pieces = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def close(self) -> None:
        """Stop generating now; the engine's generator is released."""
        self._pieces.close()

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started) * 1000

    @property
    def decode_tps(self) -> float | None:
        """Tokens after the first, per second of the time they took; None below two tokens."""
        if self.first_token_at is None or self.last_token_at is None or self.completion_tokens < 2:
            return None
        elapsed = self.last_token_at - self.first_token_at
        return (self.completion_tokens - 1) / elapsed if elapsed > 0 else None

    def _run(self) -> Generator[str, None, None]:
        decode = self._engine.detokenizer()
        tokens = self._engine.tokens(self._prompt_ids, self._sampling)
        try:
            for token in tokens:
                self._count(token)
                if token in self._engine.eos_token_ids:
                    self.finish_reason = "stop"
                    break
                text, stopped = self._stops.feed(decode(token))
                if text:
                    yield text
                if stopped:
                    self.finish_reason = "stop"
                    return
            else:
                self.finish_reason = "length"
            tail = self._stops.flush()
            if tail:
                yield tail
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()

    def _count(self, token: int) -> None:
        now = self._clock()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.completion_tokens += 1


class StopMatcher:
    """Cuts the output at the first stop string, holding back text that may be one's beginning."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return piece, False
        text = self._held + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            return text[:cut], True
        keep = max((_overlap(text, s) for s in self.stops), default=0)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _overlap(text: str, stop: str) -> int:
    """The longest end of ``text`` that is a beginning of ``stop`` (shorter than all of it)."""
    for size in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-size:]):
            return size
    return 0


class LoadedGenerator:
    """A generative model ready to serve: its engine, spec and where it came from."""

    def __init__(self, engine: TokenEngine, spec: wire.InferenceSpec, info: ModelInfo) -> None:
        self.engine = engine
        self.spec = spec
        self.info = info

    def relabelled(self, info: ModelInfo) -> LoadedGenerator:
        return LoadedGenerator(self.engine, self.spec, info)

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not messages:
            raise GenerateError('"messages" must hold at least one message')
        return self.engine.encode(self.engine.render_chat(messages))

    def start(
        self,
        prompt_ids: list[int],
        sampling: Sampling,
        stop: Sequence[str] = (),
        *,
        started: float | None = None,
    ) -> Generation:
        room = self.engine.context_length - len(prompt_ids)
        if room < 1:
            raise GenerateError(
                f"the prompt is {len(prompt_ids)} tokens; this model's context holds {self.engine.context_length}"
            )
        sampling = msgspec.structs.replace(sampling, max_tokens=min(sampling.max_tokens, room))
        return Generation(
            self.engine, prompt_ids, sampling, stop, started=time.perf_counter() if started is None else started
        )

    def greedy_ids(self, prompt: str, count: int) -> list[int]:
        """The first ``count`` greedy tokens after a raw-text prompt (no chat template): the self-test's probe."""
        ids: list[int] = []
        tokens = self.engine.tokens(self.engine.encode(prompt), Sampling(max_tokens=count, temperature=0.0))
        try:
            for token in tokens:
                ids.append(token)
                if len(ids) >= count:
                    break
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()  # frees the engine's generator now
        return ids


# --- onnxruntime-genai ----------------------------------------------------------------


class OgEngine:
    """onnxruntime-genai's model and tokenizer over one bundle directory."""

    def __init__(self, directory: Path, *, threads: int) -> None:
        import onnxruntime_genai as og  # type: ignore[import-untyped]  # the wheel ships no type hints

        self._og = og
        config = og.Config(str(directory))
        # One generation's threads; genai_config.json's own setting is the converter's guess.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.context_length, self._vocab_size = _sizes(directory)
        self.eos_token_ids = frozenset(int(t) for t in self.tokenizer.eos_token_ids)
        self._chatml = self._has_token("<|im_start|>") and self._has_token("<|im_end|>")
        self._template_works = True

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        payload = json.dumps([{"role": m.role, "content": m.content} for m in messages])
        if self._template_works:
            try:
                return str(self.tokenizer.apply_chat_template(payload, add_generation_prompt=True))
            except Exception as exc:  # onnxruntime-genai raises a bare RuntimeError when the bundle has no template
                log.warning("generate.no_chat_template error=%r; rendering it ourselves", str(exc))
                self._template_works = False
        return render_fallback(messages, chatml=self._chatml)

    def tokens(self, prompt_ids: Sequence[int], sampling: Sampling) -> Iterator[int]:
        import numpy as np

        og = self._og
        params = og.GeneratorParams(self.model)
        options: dict[str, Any] = {"max_length": len(prompt_ids) + sampling.max_tokens, "batch_size": 1}
        if sampling.greedy:
            options["do_sample"] = False
        else:
            # OpenAI's API has no top-k: every token stays a candidate (a bundle's config may say top_k 1).
            options.update(
                do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=self._vocab_size
            )
        if sampling.seed is not None:
            options["random_seed"] = sampling.seed
        params.set_search_options(**options)
        generator = og.Generator(self.model, params)
        try:
            generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
            while not generator.is_done():
                generator.generate_next_token()
                yield int(generator.get_next_tokens()[0])
        finally:
            del generator  # frees the KV cache now, not at the next garbage collection

    def detokenizer(self) -> Callable[[int], str]:
        stream = self.tokenizer.create_stream()
        return lambda token: str(stream.decode(token))

    def _has_token(self, text: str) -> bool:
        try:
            return len(self.tokenizer.encode(text)) == 1
        except Exception:
            return False


def _sizes(directory: Path) -> tuple[int, int]:
    """The bundle's context length and vocabulary size, from genai_config.json."""
    try:
        model = json.loads((directory / "genai_config.json").read_text())["model"]
        return int(model["context_length"]), int(model["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise GenerateError(f"genai_config.json lacks model.context_length or model.vocab_size: {exc}") from None


def render_fallback(messages: Sequence[ChatMessage], *, chatml: bool) -> str:
    """A prompt for a bundle without a chat template: ChatML when the vocabulary has its tokens."""
    if chatml:
        turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant:"


def load_generator(directory: Path, *, spec: wire.InferenceSpec, info: ModelInfo, threads: int) -> LoadedGenerator:
    """Load a bundle directory and generate a few tokens; raise ModelLoadError with a reason."""
    from agent.runtime import ModelLoadError

    try:
        engine = OgEngine(directory, threads=threads)
    except GenerateError as exc:
        raise ModelLoadError(str(exc)) from exc
    except Exception as exc:  # onnxruntime-genai raises untyped errors for bad bundles
        raise ModelLoadError(f"onnxruntime-genai cannot load the bundle: {exc}") from exc
    loaded = LoadedGenerator(engine, spec, info)
    try:
        loaded.greedy_ids("Hello", 2)
    except Exception as exc:
        raise ModelLoadError(f"the model fails to generate a warm-up token: {exc}") from exc
    return loaded
