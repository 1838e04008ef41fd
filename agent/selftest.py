"""The check a freshly loaded model must pass before it may serve.

With the version's ``selftest`` (wire.SelfTest), the model runs its evaluation
inputs and every answer must be within the shipped tolerance. Without one, a smoke
inference must return finite values of the shape the model declares.

A generative model decodes each prompt greedily and must agree with the reference
variant's tokens on at least ``min_token_agreement`` of the positions; without
prompts it must generate at least one token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

from agent.contract import wire
from agent.generate import LoadedGenerator
from agent.runtime import NUMPY_TYPES, Loaded, LoadedModel

if TYPE_CHECKING:
    import numpy as np

# numpy is imported by the checks that use it, like the runtime's: an idle agent never loads it.

SMOKE_TEXT: Final = "edgefleet self-test"
SMOKE_TOKENS: Final = 4


class SelfTestFailed(Exception):
    """The model loaded but gave wrong answers; the text says which, for the deployment's error."""


def run_selftest(model: Loaded, test: wire.SelfTest | None) -> None:
    try:
        if isinstance(model, LoadedGenerator):
            _check_generator(model, test)
        else:
            _run(model, test)
    except SelfTestFailed:
        raise
    except Exception as exc:  # onnxruntime and the tokenizer raise untyped errors
        raise SelfTestFailed(f"self-test could not run the model: {type(exc).__name__}: {exc}") from exc


def _run(model: LoadedModel, test: wire.SelfTest | None) -> None:
    embedding = model.spec.task == "embedding"
    if test is None or not (test.texts or test.inputs):
        _smoke_embedding(model) if embedding else _smoke_tensor(model)
    elif embedding:
        _check_embeddings(model, test)
    else:
        _check_tensors(model, test)


def _check_generator(model: LoadedGenerator, test: wire.SelfTest | None) -> None:
    if test is None or not test.prompts:
        ids = model.greedy_ids(SMOKE_TEXT, SMOKE_TOKENS)
        if not ids:
            raise SelfTestFailed(f"the model generated nothing after {SMOKE_TEXT!r}")
        return
    if len(test.token_ids) != len(test.prompts):
        raise SelfTestFailed(f"self-test has {len(test.prompts)} prompts but {len(test.token_ids)} token lists")
    agreement = token_agreement(model, test)
    if agreement < test.min_token_agreement:
        raise SelfTestFailed(
            f"greedy tokens agree with the reference on {agreement:.1%} of positions, "
            f"below the {test.min_token_agreement:.0%} the version ships"
        )


def token_agreement(model: LoadedGenerator, test: wire.SelfTest) -> float:
    """Share of reference positions where the model's own greedy token is the same; a short answer misses the rest.

    A reference may run on past its end-of-sequence token (an evaluator that does not
    stop there); a runtime stops, so positions after the first one are not compared.
    """
    eos = model.engine.eos_token_ids
    matched = total = 0
    for prompt, reference in zip(test.prompts, test.token_ids, strict=True):
        end = next((i + 1 for i, token in enumerate(reference) if token in eos), len(reference))
        expected = reference[:end]
        got = model.greedy_ids(prompt, len(expected)) if expected else []
        matched += sum(a == b for a, b in zip(got, expected, strict=False))
        total += len(expected)
    return matched / total if total else 1.0


def _smoke_embedding(model: LoadedModel) -> None:
    import numpy as np

    (vector,) = model.embed([SMOKE_TEXT])
    _finite("embedding", np.asarray(vector))
    if model.dimensions is not None and len(vector) != model.dimensions:
        raise SelfTestFailed(f"smoke embedding has {len(vector)} dimensions; the model declares {model.dimensions}")


def _smoke_tensor(model: LoadedModel) -> None:
    import numpy as np

    feed = {i.name: _zeros(i.name, i.type, i.shape) for i in model.session.get_inputs()}
    outputs = model.session.run(model.output_names, feed)
    for meta, value in zip(model.session.get_outputs(), outputs, strict=True):
        array = np.asarray(value)
        _finite(meta.name, array)
        _shape_fits(meta.name, array.shape, meta.shape)


def _check_embeddings(model: LoadedModel, test: wire.SelfTest) -> None:
    import numpy as np

    if len(test.embeddings) != len(test.texts):
        raise SelfTestFailed(f"self-test has {len(test.texts)} texts but {len(test.embeddings)} expected embeddings")
    got = np.asarray(model.embed(test.texts), dtype=np.float64)
    for index, (vector, expected) in enumerate(zip(got, test.embeddings, strict=True)):
        want = np.asarray(expected, dtype=np.float64)
        if vector.shape != want.shape:
            raise SelfTestFailed(f"text {index}: embedding has {vector.size} dimensions, expected {want.size}")
        _finite(f"embedding {index}", vector)
        cosine = float(vector @ want / max(np.linalg.norm(vector) * np.linalg.norm(want), 1e-12))
        if cosine < test.min_cosine:
            raise SelfTestFailed(
                f"text {index} ({test.texts[index][:40]!r}): cosine {cosine:.4f} to the expected embedding, "
                f"below the {test.min_cosine:g} the version ships"
            )


def _check_tensors(model: LoadedModel, test: wire.SelfTest) -> None:
    import numpy as np

    if len(test.outputs) != len(test.inputs):
        raise SelfTestFailed(f"self-test has {len(test.inputs)} input cases but {len(test.outputs)} expected outputs")
    for index, (feed, expected) in enumerate(zip(test.inputs, test.outputs, strict=True)):
        outputs = model.run(feed)
        for name, want in expected.items():
            if name not in outputs:
                raise SelfTestFailed(f"case {index}: the model has no output {name!r} (it has {sorted(outputs)})")
            _close(f"case {index} output {name!r}", np.asarray(outputs[name]), np.asarray(want), test.max_abs_error)


def _close(what: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> None:
    import numpy as np

    if got.shape != want.shape:
        raise SelfTestFailed(f"{what}: shape {list(got.shape)}, expected {list(want.shape)}")
    _finite(what, got)
    error = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if got.size else 0.0
    if error > tolerance:
        raise SelfTestFailed(f"{what}: off by up to {error:.6g}, over the {tolerance:g} the version ships")


def _finite(what: str, array: np.ndarray) -> None:
    import numpy as np

    if array.dtype.kind in "fc" and not np.all(np.isfinite(array)):
        raise SelfTestFailed(f"{what} holds NaN or infinite values")


def _shape_fits(what: str, shape: tuple[int, ...], declared: Any) -> None:
    if not isinstance(declared, list | tuple):
        return
    fixed = [d if isinstance(d, int) else None for d in declared]
    if len(fixed) != len(shape) or any(d is not None and d != s for d, s in zip(fixed, shape, strict=True)):
        raise SelfTestFailed(f"output {what} has shape {list(shape)}; the model declares {list(declared)}")


def _zeros(name: str, onnx_type: str, shape: Any) -> np.ndarray:
    import numpy as np

    dtype = NUMPY_TYPES.get(onnx_type)
    if dtype is None:
        raise SelfTestFailed(f"smoke test cannot feed input {name!r} of type {onnx_type}; ship a selftest")
    dims = [d if isinstance(d, int) and d > 0 else 1 for d in (shape or [])]
    return np.zeros(dims, dtype=dtype)
