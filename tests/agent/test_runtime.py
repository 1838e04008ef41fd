from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.contract import wire
from agent.runtime import BadInput, ModelInfo, ModelLoadError, NoActiveModel, Runner, session_providers
from tests.agent.models import (
    EMBEDDING_SPEC,
    MINILM_SPEC,
    minilm_files,
    write_embedding_model,
    write_tensor_model,
    write_tokenizer,
)

INFO = ModelInfo(deployment_id=1, sha256="a" * 64, model="tiny", version="1.0")
TENSOR = wire.InferenceSpec(task="tensor")


def cosine(a: list[float], b: list[float]) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_it_runs_a_tensor_model(tmp_path: Path) -> None:
    runner = Runner()
    runner.load(write_tensor_model(tmp_path / "m.onnx"), spec=TENSOR, info=INFO)
    outputs = runner.run({"x": [[-1.0, 0.0, 2.0, -3.5]]})
    assert outputs == {"y": [[1.0, 1.0, 3.0, 1.0]]}


def test_it_refuses_inputs_the_model_does_not_take(tmp_path: Path) -> None:
    runner = Runner()
    runner.load(write_tensor_model(tmp_path / "m.onnx"), spec=TENSOR, info=INFO)
    with pytest.raises(BadInput, match="unknown \\['z'\\], missing \\['x'\\]"):
        runner.run({"z": [[1.0]]})
    with pytest.raises(BadInput, match="refused"):
        runner.run({"x": [[1.0, 2.0]]})
    with pytest.raises(BadInput, match="rectangular"):
        runner.run({"x": [[1.0, 2.0], [1.0]]})


def test_it_says_no_model_before_one_is_loaded() -> None:
    with pytest.raises(NoActiveModel):
        Runner().embed(["hello"])
    assert Runner().info is None


def test_it_embeds_with_mean_pooling_and_unit_length(tmp_path: Path) -> None:
    runner = Runner()
    runner.load(
        write_embedding_model(tmp_path / "e.onnx"),
        spec=EMBEDDING_SPEC,
        info=INFO,
        tokenizer_path=write_tokenizer(tmp_path / "tokenizer.json"),
    )
    short, padded = runner.embed(["man", "man man man"])
    assert np.linalg.norm(short) == pytest.approx(1.0)
    # Padding must not leak into the mean: the same word once or thrice pools to the same vector.
    assert short == pytest.approx(padded)


def test_it_refuses_an_embedding_model_without_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="needs a tokenizer"):
        Runner().load(write_embedding_model(tmp_path / "e.onnx"), spec=EMBEDDING_SPEC, info=INFO)


def test_it_refuses_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load junk.onnx"):
        Runner().load(junk, spec=TENSOR, info=INFO)


def test_it_swaps_models_without_breaking_requests_in_flight(tmp_path: Path) -> None:
    runner = Runner()
    model = write_tensor_model(tmp_path / "m.onnx")
    runner.load(model, spec=TENSOR, info=INFO)
    errors: list[Exception] = []

    def hammer() -> None:
        for _ in range(200):
            try:
                runner.run({"x": [[1.0, 1.0, 1.0, 1.0]]})
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for version in range(5):
        runner.load(model, spec=TENSOR, info=ModelInfo(deployment_id=version + 2, sha256="b" * 64))
    for thread in threads:
        thread.join()
    assert errors == []
    assert runner.info is not None and runner.info.deployment_id == 6


def test_it_never_hands_work_to_a_remote_provider() -> None:
    providers = session_providers()
    assert providers[-1] == "CPUExecutionProvider"
    assert "AzureExecutionProvider" not in providers


def test_it_embeds_similar_sentences_closer_with_the_real_minilm() -> None:
    model, tokenizer = minilm_files()
    runner = Runner()
    runner.load(model, spec=MINILM_SPEC, info=INFO, tokenizer_path=tokenizer)
    food, bread, movie = runner.embed(
        ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awful."]
    )
    assert len(food) == 384
    assert cosine(food, bread) > cosine(food, movie) + 0.3
