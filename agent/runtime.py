"""Running the active model with onnxruntime.

A LoadedModel is immutable once built: the session, the tokenizer and how to use
them. The Runner holds a reference to the current one; swapping models builds
and warms the new one fully first, then swaps the reference under a lock, so a
request in flight finishes on the model it started with.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import msgspec

from agent.contract import wire

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from agent.generate import LoadedGenerator

# onnxruntime, tokenizers and numpy are imported when the first model loads, not before:
# together they are about 55 MB of an idle agent's RSS (numpy alone is 19 MB).

log = logging.getLogger(__name__)

TEXT_INPUTS: Final = ("input_ids", "attention_mask", "token_type_ids")
# Providers that run the model somewhere else, not on this device.
_REMOTE_PROVIDERS: Final = frozenset({"AzureExecutionProvider"})
_WARM_UP_TEXT: Final = "warm up"

# The numpy dtype of each ONNX tensor type the agent can feed.
NUMPY_TYPES: Final = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class ModelLoadError(RuntimeError):
    """The model or its tokenizer cannot be loaded or does not fit its inference spec."""


class NoActiveModel(RuntimeError):
    """Inference was asked for before any model was loaded."""


class BadInput(ValueError):
    """The caller's inputs do not fit the model. The text says how."""


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Which deployment a loaded model came from."""

    deployment_id: int
    sha256: str
    model: str = ""
    version: str = ""
    tokenizer_sha256: str | None = None


def session_providers() -> list[str]:
    """Every local provider onnxruntime offers, best first, CPU always last as the fallback."""
    import onnxruntime as ort

    local = [p for p in ort.get_available_providers() if p not in _REMOTE_PROVIDERS and p != "CPUExecutionProvider"]
    return [*local, "CPUExecutionProvider"]


class LoadedModel:
    """One model ready to run: session, optional tokenizer, spec and where it came from."""

    def __init__(
        self, session: ort.InferenceSession, tokenizer: Tokenizer | None, spec: wire.InferenceSpec, info: ModelInfo
    ):
        self.session = session
        self.tokenizer = tokenizer
        self.spec = spec
        self.info = info
        self.input_types = {i.name: i.type for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    def relabelled(self, info: ModelInfo) -> LoadedModel:
        return LoadedModel(self.session, self.tokenizer, self.spec, info)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        if self.spec.task != "embedding" or self.tokenizer is None:
            raise BadInput(f"model {self.info.model!r} is a tensor model: send inputs, not text")
        if not texts:
            return []
        import numpy as np

        feed = self._encode(texts)
        hidden = self.session.run(self.output_names[:1], feed)[0]
        vectors = pool(np.asarray(hidden, dtype=np.float32), feed.get("attention_mask"), self.spec.pooling)
        if self.spec.normalize:
            vectors = l2_normalize(vectors)
        result: list[list[float]] = vectors.tolist()
        return result

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np
        from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

        feed = self._tensor_feed(inputs)
        try:
            outputs = self.session.run(self.output_names, feed)
        except InvalidArgument as exc:  # a shape or rank the model does not declare: the caller's fault
            raise BadInput(f"the model refused the inputs: {exc}") from None
        # A node failing on inputs that fit the declared shapes (Fail) is the model's fault: it
        # propagates, the caller gets a 500 and probation counts it.
        return {name: np.asarray(value).tolist() for name, value in zip(self.output_names, outputs, strict=True)}

    @property
    def dimensions(self) -> int | None:
        shape = self.session.get_outputs()[0].shape
        return shape[-1] if shape and isinstance(shape[-1], int) else None

    def _encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        import numpy as np

        assert self.tokenizer is not None
        # encode_batch hands even one text to its thread pool: 137 µs against 47 µs for encode,
        # for one MiniLM sentence on the 2-CPU dev box.
        encodings = [self.tokenizer.encode(texts[0])] if len(texts) == 1 else self.tokenizer.encode_batch(list(texts))
        columns = {
            "input_ids": [e.ids for e in encodings],
            "attention_mask": [e.attention_mask for e in encodings],
            "token_type_ids": [e.type_ids for e in encodings],
        }
        return {name: np.asarray(columns[name], dtype=np.int64) for name in self.input_types}

    def _tensor_feed(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        unknown = sorted(set(inputs) - set(self.input_types))
        missing = sorted(set(self.input_types) - set(inputs))
        if unknown or missing:
            raise BadInput(f"model inputs are {sorted(self.input_types)}; unknown {unknown}, missing {missing}")
        return {name: _to_array(name, value, self.input_types[name]) for name, value in inputs.items()}


def pool(hidden: np.ndarray, mask: np.ndarray | None, pooling: str) -> np.ndarray:
    """[batch, seq, hidden] to [batch, hidden]; a 2-D output is already pooled."""
    if hidden.ndim == 2:
        return hidden
    if hidden.ndim != 3:
        raise BadInput(f"an embedding model must output [batch, seq, hidden], not {list(hidden.shape)}")
    import numpy as np

    pooled: np.ndarray
    if pooling == "cls":
        pooled = hidden[:, 0, :]
    elif mask is None:
        pooled = hidden.mean(axis=1)
    else:
        weights = mask.astype(np.float32)[:, :, None]
        # np.maximum, not np.clip: the same floor at a fraction of the call overhead.
        pooled = (hidden * weights).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-9)
    return pooled


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    import numpy as np

    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: np.ndarray = vectors / np.maximum(norms, 1e-12)
    return unit


def _to_array(name: str, value: Any, onnx_type: str) -> np.ndarray:
    import numpy as np

    dtype = NUMPY_TYPES.get(onnx_type)
    if dtype is None:
        raise BadInput(f"input {name!r} has type {onnx_type}, which this agent cannot feed")
    try:
        return np.asarray(value, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise BadInput(f"input {name!r} is not a rectangular array of {onnx_type}: {exc}") from None


def load_model(
    model_path: Path, *, spec: wire.InferenceSpec, info: ModelInfo, tokenizer_path: Path | None = None
) -> LoadedModel:
    """Load and warm up a model; raise ModelLoadError with a reason a person can act on."""
    session = _open_session(model_path)
    tokenizer = _open_tokenizer(tokenizer_path, spec) if tokenizer_path else None
    loaded = LoadedModel(session, tokenizer, spec, info)
    if spec.task == "embedding":
        _check_embedding_model(loaded)
    return loaded


def _open_session(model_path: Path) -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # onnxruntime's worker threads spin for a while after each run by default: on a
    # small device that is CPU (and battery) taken from the application calling us.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=session_providers())
    except Exception as exc:  # onnxruntime raises its own untyped pybind errors
        raise ModelLoadError(f"onnxruntime cannot load {model_path.name}: {exc}") from exc


def _open_tokenizer(path: Path, spec: wire.InferenceSpec) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad files
        raise ModelLoadError(f"cannot load tokenizer {path.name}: {exc}") from exc
    padding = tokenizer.padding or {}
    tokenizer.enable_truncation(max_length=spec.max_length)
    # Pad to the longest text of each batch, not to a fixed length a tokenizer.json may carry.
    tokenizer.enable_padding(pad_id=padding.get("pad_id", 0), pad_token=padding.get("pad_token", "[PAD]"))
    return tokenizer


def _check_embedding_model(loaded: LoadedModel) -> None:
    if loaded.tokenizer is None:
        raise ModelLoadError("an embedding model needs a tokenizer file in its deployment")
    unfed = sorted(set(loaded.input_types) - set(TEXT_INPUTS))
    if unfed:
        raise ModelLoadError(f"an embedding model may only take {list(TEXT_INPUTS)}; this one also takes {unfed}")
    try:
        loaded.embed([_WARM_UP_TEXT])
    except Exception as exc:
        raise ModelLoadError(f"the model fails on a warm-up text: {exc}") from exc


# What the runner can hold: an encoder or tensor model, or a generative one (agent.generate).
Loaded: TypeAlias = "LoadedModel | LoadedGenerator"


class Runner:
    """The agent's current model. Thread-safe: onnxruntime sessions run concurrently."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: Loaded | None = None

    def load(
        self, model_path: Path, *, spec: wire.InferenceSpec, info: ModelInfo, tokenizer_path: Path | None = None
    ) -> LoadedModel:
        loaded = load_model(model_path, spec=spec, info=info, tokenizer_path=tokenizer_path)
        self.install(loaded)
        return loaded

    def install(self, loaded: Loaded) -> None:
        """Make a fully loaded model the current one; requests already running finish on the old one."""
        with self._lock:
            self._model = loaded
        log.info(
            "runtime.installed model=%r version=%r sha256=%s",
            loaded.info.model,
            loaded.info.version,
            loaded.info.sha256[:12],
        )

    def relabel(self, info: ModelInfo) -> None:
        """Keep the loaded session but credit it to another deployment of the same files."""
        with self._lock:
            if self._model is not None:
                self._model = self._model.relabelled(info)

    def current(self) -> Loaded:
        model = self._model
        if model is None:
            raise NoActiveModel("no model is active on this device yet")
        return model

    @property
    def info(self) -> ModelInfo | None:
        model = self._model
        return model.info if model else None

    def current_onnx(self) -> LoadedModel:
        """The current model when it takes tensors or texts to embed; BadInput for a generative one."""
        model = self.current()
        if not isinstance(model, LoadedModel):
            raise BadInput(
                f"model {model.info.model!r} generates text: POST /v1/chat/completions (OpenAI's API) instead"
            )
        return model

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return self.current_onnx().embed(texts)

    def run(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return self.current_onnx().run(inputs)
