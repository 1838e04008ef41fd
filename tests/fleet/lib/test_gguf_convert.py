"""GGUF to onnxruntime-genai bundle, on a tiny random-weight llama written in code."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from fleet.lib.gguf import convert as converter
from fleet.lib.gguf.convert import BUNDLE_FILES, DEFAULT_CONTEXT, cache_key, convert, is_current, package_versions
from fleet.lib.gguf.evaluate import DecoderShape, forced_agreement, greedy_tokens, perplexity, token_agreement
from fleet.lib.gguf.quant import repack_q4_1, repack_q8_0, rtn_int4, rtn_int8
from fleet.lib.gguf.reader import GGUFError, GGUFModel
from fleet.lib.gguf.reference import NumpyLlama
from tests.fleet.lib.gguf_fixtures import tiny_vocab, write_tiny_llama

PROMPT = [1, 60, 73, 84, 2, 198, 1, 40, 72]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def session(bundle):
    return ort.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])


def test_it_reads_the_config_and_tokenizer_from_metadata(tiny_gguf):
    model = GGUFModel(tiny_gguf)
    assert (model.config.num_layers, model.config.hidden_size, model.config.num_kv_heads) == (2, 64, 2)
    summary = model.summary()
    assert summary["tensor_types"] == {"Q8_0": 1, "F32": 5, "Q4_1": 14}
    assert summary["chat_template"] is True


def test_it_refuses_a_file_that_is_not_gguf(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        GGUFModel(bogus)


def test_it_repacks_q4_1_and_q8_0_blocks_without_loss(tiny_gguf):
    model = GGUFModel(tiny_gguf)
    for name, repack in (("blk.0.ffn_up.weight", repack_q4_1), ("token_embd.weight", repack_q8_0)):
        np.testing.assert_array_equal(repack(model.raw(name)).dequantize(), model.dequantized(name))


def test_it_rounds_to_int4_and_int8_within_half_a_step():
    w = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
    assert np.abs(rtn_int4(w).dequantize() - w).max() <= (w.max() - w.min()) / 15
    assert np.abs(rtn_int8(w).dequantize() - w).max() <= np.abs(w).max() / 127


@pytest.mark.parametrize("variant", ["fp32", "repack"])
def test_it_gives_the_same_greedy_tokens_as_numpy_over_the_dequantized_weights(tiny_gguf, tmp_path, variant):
    bundle = tmp_path / variant
    # accuracy_level 0: float32 arithmetic, so the lossless repack must match exactly.
    convert(tiny_gguf, bundle, variant=variant, accuracy_level=0)
    expected = NumpyLlama(GGUFModel(tiny_gguf)).greedy(PROMPT, 12)
    assert greedy_tokens(session(bundle), DecoderShape.from_bundle(bundle), PROMPT, 12) == expected


def test_it_writes_a_bundle_onnxruntime_genai_loads_and_decodes_deterministically(tiny_gguf, tmp_path):
    og = pytest.importorskip("onnxruntime_genai")
    bundle = tmp_path / "repack"
    recipe = convert(tiny_gguf, bundle, variant="repack")
    assert sorted(recipe["files"]) == sorted(BUNDLE_FILES)
    assert json.loads((bundle / "tokenizer_config.json").read_text())["chat_template"].startswith("{% for")

    model = og.Model(str(bundle))
    tokenizer = og.Tokenizer(model)
    text = "<|im_start|>user\nthe 2024 is<|im_end|>"
    reference = Tokenizer.from_file(str(bundle / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert [int(t) for t in tokenizer.encode(text)] == reference
    assert reference[:2] == [1, 3 + ord("u")] and reference[-1] == 2 and "Ġthe" in tiny_vocab()

    def generate():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPT) + 10, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(PROMPT)
        out = []
        while not generator.is_done():
            generator.generate_next_token()
            out.append(int(generator.get_next_tokens()[0]))
        return out

    first = generate()
    assert first == generate()
    ours = greedy_tokens(session(bundle), DecoderShape.from_bundle(bundle), PROMPT, 10, stop_at_eos=True)
    assert first == ours


def test_it_measures_agreement_and_perplexity_against_the_reference(tiny_gguf, tmp_path):
    convert(tiny_gguf, tmp_path / "fp32", variant="fp32")
    convert(tiny_gguf, tmp_path / "int4", variant="int4")
    shape = DecoderShape.from_bundle(tmp_path / "fp32")
    reference = greedy_tokens(session(tmp_path / "fp32"), shape, PROMPT, 8)
    assert all(forced_agreement(session(tmp_path / "fp32"), shape, PROMPT, reference))
    assert token_agreement([reference], [reference]) == 1.0
    assert token_agreement([reference], [[reference[0], -1, *reference[2:]]]) == 1 / 8
    unlikely = [int(t) for t in np.random.default_rng(3).integers(3, 259, size=8)]
    for variant in ("fp32", "int4"):
        # The model's own greedy continuation is far likelier than random bytes.
        assert (
            1.0
            < perplexity(session(tmp_path / variant), shape, PROMPT + reference)
            < perplexity(session(tmp_path / variant), shape, PROMPT + unlikely)
        )


def test_it_stamps_a_bundle_and_a_changed_converter_or_package_misses_the_cache(tiny_gguf, tmp_path, monkeypatch):
    convert(tiny_gguf, tmp_path / "int4", variant="int4")
    key = cache_key(variant="int4", context_length=DEFAULT_CONTEXT, accuracy_level=4)

    assert is_current(tmp_path / "int4", key)
    assert not is_current(tmp_path / "int4", {**key, "variant": "int8"})
    assert not is_current(tmp_path / "int4", {**key, "packages": {**package_versions(), "onnx": "0.0.1"}})
    monkeypatch.setattr(converter, "CONVERTER_VERSION", converter.CONVERTER_VERSION + 1)
    assert not is_current(
        tmp_path / "int4", cache_key(variant="int4", context_length=DEFAULT_CONTEXT, accuracy_level=4)
    )
    assert not is_current(tmp_path / "nothing", key)


def test_it_converts_again_with_if_stale_only_once_the_converter_changed(tiny_gguf, tmp_path, monkeypatch, capsys):
    out = tmp_path / "int4"
    args = [str(tiny_gguf), str(out), "--variant", "int4", "--if-stale"]
    assert converter.main(args) == 0
    made = (out / "model.onnx").stat().st_ino

    assert converter.main(args) == 0
    assert (out / "model.onnx").stat().st_ino == made
    assert "up to date" in capsys.readouterr().out

    monkeypatch.setattr(converter, "CONVERTER_VERSION", converter.CONVERTER_VERSION + 1)
    assert converter.main(args) == 0
    assert (out / "model.onnx").stat().st_ino != made
    assert json.loads((out / converter.STAMP).read_text())["converter"] == converter.CONVERTER_VERSION
