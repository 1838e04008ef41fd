"""Greedy decoding, perplexity and token agreement over a converted decoder, with plain onnxruntime.

The session is passed in; these functions only feed it ``input_ids``, ``attention_mask`` and
the KV cache the way onnxruntime-genai does, so what they measure is the bundle itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DecoderShape:
    """What feeding the graph needs to know, read from the bundle's genai_config.json."""

    num_layers: int
    num_kv_heads: int
    head_size: int
    eos_token_id: int

    @classmethod
    def from_bundle(cls, bundle: Path) -> DecoderShape:
        model = json.loads((Path(bundle) / "genai_config.json").read_text())["model"]
        decoder = model["decoder"]
        eos = model["eos_token_id"]
        return cls(
            decoder["num_hidden_layers"],
            decoder["num_key_value_heads"],
            decoder["head_size"],
            eos[0] if isinstance(eos, list) else eos,
        )


def _empty_cache(shape: DecoderShape) -> dict[str, np.ndarray]:
    cache = {}
    for i in range(shape.num_layers):
        for kv in ("key", "value"):
            cache[f"past_key_values.{i}.{kv}"] = np.zeros((1, shape.num_kv_heads, 0, shape.head_size), dtype=np.float32)
    return cache


def _step(session, shape: DecoderShape, ids: Sequence[int], cache: dict, total: int) -> tuple[np.ndarray, dict]:
    feed = {
        "input_ids": np.asarray([ids], dtype=np.int64),
        "attention_mask": np.ones((1, total), dtype=np.int64),
        **cache,
    }
    outputs = session.run(None, feed)
    names = [o.name for o in session.get_outputs()]
    present = dict(zip(names, outputs, strict=True))
    new_cache = {
        f"past_key_values.{i}.{kv}": present[f"present.{i}.{kv}"]
        for i in range(shape.num_layers)
        for kv in ("key", "value")
    }
    return present["logits"][0], new_cache


def greedy_tokens(
    session, shape: DecoderShape, prompt_ids: Sequence[int], n_tokens: int, *, stop_at_eos: bool = False
) -> list[int]:
    """The first ``n_tokens`` greedy token ids after the prompt (prefill once, then one token a step)."""
    logits, cache = _step(session, shape, list(prompt_ids), _empty_cache(shape), len(prompt_ids))
    out: list[int] = []
    total = len(prompt_ids)
    while len(out) < n_tokens:
        token = int(np.argmax(logits[-1]))
        out.append(token)
        if stop_at_eos and token == shape.eos_token_id:
            break
        total += 1
        logits, cache = _step(session, shape, [token], cache, total)
    return out


def perplexity(session, shape: DecoderShape, ids: Sequence[int]) -> float:
    """exp of the mean negative log-likelihood of each token given the ones before it."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    logits, _ = _step(session, shape, list(ids), _empty_cache(shape), len(ids))
    logits = logits[:-1].astype(np.float64)
    logits -= logits.max(axis=-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
    nll = -logprobs[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float(np.exp(nll.mean()))


def token_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> float:
    """The share of positions, over all prompts, where the candidate's greedy token is the reference's.

    Positions count up to the first disagreement and the rest of that prompt counts as
    disagreeing: once a token differs, the continuations are no longer comparable.
    """
    agreed = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        total += len(ref)
        for a, b in zip(ref, cand, strict=False):
            if a != b:
                break
            agreed += 1
    return agreed / total if total else 1.0


def forced_agreement(session, shape: DecoderShape, prompt_ids: Sequence[int], reference: Sequence[int]) -> list[bool]:
    """At each of the reference's positions, whether the candidate's greedy choice is the reference's
    token, given the prompt and the reference's tokens before it (one pass, teacher-forced).

    Unlike free-running decoding, one early near-tie does not make every later position count
    as a disagreement.
    """
    ids = list(prompt_ids) + list(reference)
    logits, _ = _step(session, shape, ids, _empty_cache(shape), len(ids))
    start = len(prompt_ids) - 1
    chosen = np.argmax(logits[start : start + len(reference)], axis=-1)
    return [int(a) == int(b) for a, b in zip(chosen, reference, strict=True)]


# --- The evaluation set of a generative version -----------------------------------------

PROMPTS_PATH = Path(__file__).resolve().parents[1] / "data" / "slm_prompts.json"
# Greedy tokens compared per prompt; the device's self-test checks the first SELFTEST_TOKENS.
AGREEMENT_TOKENS = 32


def default_prompts() -> tuple[list[str], str]:
    """The shipped prompt set and held-out text (fleet/lib/data/slm_prompts.json)."""
    data = json.loads(PROMPTS_PATH.read_text(encoding="utf-8"))
    return list(data["prompts"]), str(data["heldout"])


def chat_prompt(chat_template: str, question: str) -> str:
    """One user turn in the model's chat format, ready for generation, as plain text.

    ChatML templates (``<|im_start|>``) are written out here, as the plane has no Jinja;
    any other template gets a plain question-and-answer frame.
    """
    if "<|im_start|>" in chat_template:
        return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return f"Question: {question}\nAnswer:"


def session_for(bundle: Path, *, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(Path(bundle) / "model.onnx"), options, providers=["CPUExecutionProvider"])


def _encode(bundle: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(bundle) / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def build_evaluation_set(
    reference: Path, *, questions: list[str], heldout: str, n_tokens: int = AGREEMENT_TOKENS
) -> dict:
    """The prompts, the reference bundle's first ``n_tokens`` greedy ids for each (fewer when it ends
    its answer sooner), and the held-out text."""
    reference = Path(reference)
    template = json.loads((reference / "tokenizer_config.json").read_text()).get("chat_template", "")
    prompts = [chat_prompt(template, q) for q in questions]
    session, shape = session_for(reference), DecoderShape.from_bundle(reference)
    prompt_ids = [_encode(reference, p) for p in prompts]
    context = json.loads((reference / "genai_config.json").read_text())["model"]["context_length"]
    heldout_ids = _encode(reference, heldout)[:context]
    return {
        "prompts": prompts,
        "prompt_ids": prompt_ids,
        # Up to and with the end-of-sequence token: past it a runtime stops, and what a
        # model would say after its own end is no answer to compare.
        "token_ids": [greedy_tokens(session, shape, ids, n_tokens, stop_at_eos=True) for ids in prompt_ids],
        "heldout": heldout,
        "heldout_ids": heldout_ids,
        "reference_perplexity": perplexity(session, shape, heldout_ids),
    }


def evaluate_bundle(bundle: Path, evaluation_set: dict) -> dict:
    """A variant against the set: free-running token agreement (as the device's self-test counts
    it), teacher-forced agreement, and perplexity on the held-out text."""
    session, shape = session_for(bundle), DecoderShape.from_bundle(bundle)
    reference = evaluation_set["token_ids"]
    ours = [
        greedy_tokens(session, shape, ids, len(ref))
        for ids, ref in zip(evaluation_set["prompt_ids"], reference, strict=True)
    ]
    forced = [
        forced_agreement(session, shape, ids, ref)
        for ids, ref in zip(evaluation_set["prompt_ids"], reference, strict=True)
    ]
    return {
        "token_agreement": positional_agreement(reference, ours),
        "prefix_agreement": token_agreement(reference, ours),
        "forced_agreement": sum(map(sum, forced)) / max(1, sum(map(len, forced))),
        "perplexity": perplexity(session, shape, evaluation_set["heldout_ids"]),
        "samples": len(reference),
    }


def positional_agreement(reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]]) -> float:
    """The share of reference positions where the candidate's free-running greedy token is the same:
    the agent's self-test counts it this way (agent.selftest.token_agreement)."""
    matched = sum(
        sum(a == b for a, b in zip(ref, cand, strict=False)) for ref, cand in zip(reference, candidate, strict=True)
    )
    total = sum(len(ref) for ref in reference)
    return matched / total if total else 1.0
