"""The BERT graph builder against a numpy forward pass of the same weights."""

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from fleet.lib import bert_onnx, evaluation
from tests.fleet.bert_fixtures import write_tiny_checkpoint


@pytest.mark.parametrize("prefix", ["", "bert."], ids=["bare-names", "bert-prefixed"])
def test_it_exports_a_graph_that_matches_the_numpy_reference(tmp_path, prefix):
    directory = write_tiny_checkpoint(tmp_path / "ckpt", prefix=prefix)
    config = bert_onnx.export_checkpoint(directory, tmp_path / "model.onnx")
    inputs = evaluation.text_inputs(directory / "tokenizer.json", evaluation.default_sentences(), max_length=64)

    # ORT's full graph optimizations run: the position Slice must survive them.
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["last_hidden_state"], inputs)[0]
    expected = bert_onnx.reference_forward(config, bert_onnx.load_weights(directory / "model.safetensors"), **inputs)

    mask = inputs["attention_mask"]
    cosine = evaluation.cosines(bert_onnx.mean_pool(got, mask), bert_onnx.mean_pool(expected, mask))
    assert cosine.min() >= 0.9999
    assert np.abs(got - expected).max() < 1e-3


def test_it_takes_any_batch_and_sequence_length(tmp_path):
    directory = write_tiny_checkpoint(tmp_path / "ckpt")
    bert_onnx.export_checkpoint(directory, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])

    for batch, length in [(1, 3), (5, 40)]:
        ids = np.ones((batch, length), np.int64)
        feeds = {"input_ids": ids, "attention_mask": ids, "token_type_ids": np.zeros_like(ids)}
        assert session.run(None, feeds)[0].shape == (batch, length, 64)


def test_it_refuses_a_checkpoint_that_is_not_bert(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2Model"]}')

    with pytest.raises(bert_onnx.CheckpointError, match="not BERT-family"):
        bert_onnx.BertConfig.from_file(Path(tmp_path / "config.json"))
