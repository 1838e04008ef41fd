"""OpenAI's chat completions API, the parts a local generative model serves.

Parsing a request into messages and sampling, and shaping ``chat.completion`` and
``chat.completion.chunk`` objects as OpenAI's API returns them, so an existing
OpenAI client works with its ``base_url`` pointed at the agent. No HTTP here:
agent.server carries these over the wire.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Final

import msgspec

from agent.generate import MAX_STOP_STRINGS, ROLES, ChatMessage, FinishReason, GenerateError, Sampling

MAX_MESSAGES: Final = 256
MAX_RETRY_AFTER_S: Final = 60


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str = ""


class MessageIn(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ChatRequest(msgspec.Struct, kw_only=True):
    """The body of POST /v1/chat/completions; fields OpenAI defines and we do not use are ignored."""

    messages: Annotated[list[MessageIn], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    model: str = ""
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    stop: str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # onnxruntime-genai takes a 32-bit seed; a bigger one is the caller's error, not the model's.
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=1)] = 1

    def chat_messages(self) -> list[ChatMessage]:
        messages = []
        for index, message in enumerate(self.messages):
            if message.role not in ROLES:
                raise GenerateError(f"messages[{index}].role {message.role!r} is not one of {sorted(ROLES)}")
            messages.append(ChatMessage(message.role, _text(message.content)))
        return messages

    def sampling(self, default_max_tokens: int) -> Sampling:
        return Sampling(
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
        )

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if any(part.type != "text" for part in content):
        raise GenerateError("this model takes text only: every content part must be of type text")
    return "".join(part.text for part in content)


_decode_request: Final = msgspec.json.Decoder(ChatRequest).decode


def parse_request(body: bytes) -> ChatRequest:
    try:
        return _decode_request(body)
    except msgspec.ValidationError as exc:
        raise GenerateError(f"bad chat completion request: {exc}") from None
    except msgspec.DecodeError:
        raise GenerateError("body is not valid JSON") from None


class Completion:
    """The identity shared by a completion's response or every chunk of its stream."""

    def __init__(self, model: str) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def response(self, text: str, finish_reason: FinishReason | None, usage: dict[str, int]) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason or "stop",
        }
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage}

    def chunk(
        self, delta: dict[str, Any], finish_reason: FinishReason | None = None, *, usage: bool = False
    ) -> dict[str, Any]:
        """One piece of a stream; with ``usage`` (include_usage asked for) it says ``"usage": null``, as OpenAI's do."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        if usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: its clients raise it with ``message`` as the text."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def models_list(model: str | None) -> dict[str, Any]:
    data = [{"id": model, "object": "model", "created": 0, "owned_by": "edgefleet"}] if model else []
    return {"object": "list", "data": data}


class Busy(Exception):
    """Every generation slot is taken and the waiting line is full; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the model is busy; retry after {retry_after}s")
        self.retry_after = retry_after


class GenerationQueue:
    """At most ``running`` generations at once and ``waiting`` more in line; past that, Busy.

    Generations share the device's cores, so running more at once only slows each;
    the line keeps callers in order, and its bound keeps their threads bounded.
    """

    def __init__(self, running: int, waiting: int) -> None:
        self.running = running
        self.max_waiting = waiting
        self._slots = threading.BoundedSemaphore(running)
        self._lock = threading.Lock()
        self._waiting = 0
        self._durations: deque[float] = deque(maxlen=16)

    @property
    def waiting(self) -> int:
        return self._waiting

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self._waiting >= self.max_waiting:
                    raise Busy(self.retry_after())
                self._waiting += 1
            try:
                self._slots.acquire()
            finally:
                with self._lock:
                    self._waiting -= 1
        started = time.perf_counter()
        try:
            yield
        finally:
            self._durations.append(time.perf_counter() - started)
            self._slots.release()

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the line ahead times a recent generation's length."""
        durations = list(self._durations)
        typical = sum(durations) / len(durations) if durations else 1.0
        estimate = math.ceil(typical * (self._waiting + 1) / self.running)
        return min(max(estimate, 1), MAX_RETRY_AFTER_S)
