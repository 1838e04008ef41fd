"""A Hugging Face ``tokenizer.json`` (and ``tokenizer_config.json``) from a GGUF's GPT-2 BPE.

llama.cpp keeps the byte-level vocabulary, the merges and each token's type; the
pre-tokenizer is named by ``tokenizer.ggml.pre``. Control tokens (type 3) and user-defined
tokens (type 4) become added tokens, so they are matched whole and never split.
"""

from __future__ import annotations

from .reader import GGUFError, GGUFModel

_CONTROL, _USER_DEFINED = 3, 4

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
# llama.cpp's pre-tokenizers that differ from GPT-2's only in splitting every digit apart.
_DIGITS_APART = {"smollm", "starcoder", "refact", "codeshell"}


def _pre_tokenizer(pre: str) -> dict:
    if pre in _DIGITS_APART:
        return {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]}
    return _BYTE_LEVEL


def tokenizer_json(model: GGUFModel) -> dict:
    kind = model.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"{model.path.name}: tokenizer {kind!r} is not supported (only GPT-2 byte-level BPE)")
    tokens = [str(t) for t in model.field("tokenizer.ggml.tokens")]
    types = [int(t) for t in model.field("tokenizer.ggml.token_type", [1] * len(tokens))]
    merges = [str(m) for m in model.field("tokenizer.ggml.merges", [])]
    added = [
        {
            "id": i,
            "content": tok,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind_ == _CONTROL,
        }
        for i, (tok, kind_) in enumerate(zip(tokens, types, strict=True))
        if kind_ in (_CONTROL, _USER_DEFINED)
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": _pre_tokenizer(str(model.field("tokenizer.ggml.pre", "gpt2"))),
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {tok: i for i, tok in enumerate(tokens)},
            "merges": merges,
        },
    }


def tokenizer_config_json(model: GGUFModel) -> dict:
    tokens = model.field("tokenizer.ggml.tokens")
    c = model.config

    def token(i: int) -> str | None:
        return str(tokens[i]) if 0 <= i < len(tokens) else None

    config = {
        "add_bos_token": bool(model.field("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(model.field("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "bos_token": token(c.bos_token_id),
        "eos_token": token(c.eos_token_id),
        "pad_token": token(c.pad_token_id),
        "unk_token": token(int(model.field("tokenizer.ggml.unknown_token_id", 0))),
        "clean_up_tokenization_spaces": False,
        "model_max_length": c.context_length,
        "tokenizer_class": "GPT2Tokenizer",
    }
    template = model.field("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return config
