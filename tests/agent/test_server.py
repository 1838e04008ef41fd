from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.contract import wire
from agent.runtime import ModelInfo, Runner
from agent.server import MAX_BODY_BYTES, MAX_TEXTS, InferenceServer
from agent.telemetry import LatencyRecorder
from tests.agent.models import EMBEDDING_SPEC, write_embedding_model, write_tensor_model, write_tokenizer

INFO = ModelInfo(deployment_id=3, sha256="c" * 64, model="tiny-encoder", version="2.1.0")


@pytest.fixture
def runner() -> Runner:
    return Runner()


@pytest.fixture
def recorder() -> LatencyRecorder:
    return LatencyRecorder()


@pytest.fixture
def server(runner: Runner, recorder: LatencyRecorder) -> Iterator[InferenceServer]:
    server = InferenceServer(runner, recorder, port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def embedding(runner: Runner, tmp_path: Path) -> Runner:
    runner.load(
        write_embedding_model(tmp_path / "e.onnx"),
        spec=EMBEDDING_SPEC,
        info=INFO,
        tokenizer_path=write_tokenizer(tmp_path / "tokenizer.json"),
    )
    return runner


def call(server: InferenceServer, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def post(server: InferenceServer, payload: Any) -> tuple[int, Any]:
    return call(server, "POST", "/v1/infer", json.dumps(payload).encode())


def test_it_reports_no_model_before_a_deployment(server: InferenceServer) -> None:
    assert call(server, "GET", "/v1/health") == (
        200,
        {"status": "no_model", "model": None, "version": None, "sha256": None},
    )


def test_it_answers_503_with_what_to_do_before_a_deployment(server: InferenceServer, recorder: LatencyRecorder) -> None:
    status, body = post(server, {"text": "hello"})
    assert status == 503
    assert "deploy one from the control plane" in body["error"]
    assert recorder.drain()[:2] == (1, 1)


def test_it_embeds_one_text(server: InferenceServer, embedding: Runner, recorder: LatencyRecorder) -> None:
    status, body = post(server, {"text": "a man is eating food"})
    assert status == 200
    assert (body["dimensions"], body["model"], body["version"]) == (4, "tiny-encoder", "2.1.0")
    assert len(body["embeddings"]) == 1 and len(body["embeddings"][0]) == 4
    assert body["latency_ms"] >= 0
    requests, errors, latency = recorder.drain()
    assert (requests, errors) == (1, 0)
    assert latency is not None and latency.count == 1


def test_it_embeds_a_batch(server: InferenceServer, embedding: Runner) -> None:
    status, body = post(server, {"texts": ["a man", "the movie is awful", "bread"]})
    assert status == 200
    assert len(body["embeddings"]) == 3


def test_it_reports_the_model_in_health(server: InferenceServer, embedding: Runner) -> None:
    assert call(server, "GET", "/v1/health") == (
        200,
        {"status": "ok", "model": "tiny-encoder", "version": "2.1.0", "sha256": "c" * 64},
    )


def test_it_runs_a_tensor_model(server: InferenceServer, runner: Runner, tmp_path: Path) -> None:
    runner.load(write_tensor_model(tmp_path / "m.onnx"), spec=wire.InferenceSpec(), info=INFO)
    status, body = post(server, {"inputs": {"x": [[-1, 2, 0, 0]]}})
    assert status == 200
    assert body["outputs"] == {"y": [[1.0, 3.0, 1.0, 1.0]]}


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (["a list"], "send a JSON object"),
        ({"txt": "typo"}, 'send {"text"'),
        ({"text": 42}, '"text" must be a string'),
        ({"texts": []}, "between 1 and"),
        ({"texts": ["x"] * (MAX_TEXTS + 1)}, "between 1 and"),
        ({"inputs": {"x": [[1, 2, 3, 4]]}}, "unknown"),
    ],
)
def test_it_answers_400_for_bad_input(server: InferenceServer, embedding: Runner, payload: Any, error: str) -> None:
    status, body = post(server, payload)
    assert status == 400
    assert error in body["error"]


def test_it_answers_400_for_a_body_that_is_not_json(server: InferenceServer, embedding: Runner) -> None:
    assert call(server, "POST", "/v1/infer", b"{nope") == (400, {"error": "body is not valid JSON"})


def test_it_answers_400_for_a_body_over_the_limit(server: InferenceServer, embedding: Runner) -> None:
    status, body = call(server, "POST", "/v1/infer", b" " * (MAX_BODY_BYTES + 1))
    assert status == 400
    assert "limit" in body["error"]


def test_it_answers_404_for_an_unknown_path(server: InferenceServer) -> None:
    assert call(server, "GET", "/v2/nothing")[0] == 404
    assert call(server, "POST", "/v1/other", b"{}")[0] == 404


def test_it_keeps_a_connection_alive_across_requests(server: InferenceServer, embedding: Runner) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        for _ in range(3):
            connection.request("POST", "/v1/infer", body=b'{"text": "bread"}')
            response = connection.getresponse()
            assert response.status == 200
            response.read()
    finally:
        connection.close()


def test_it_answers_concurrent_requests_and_records_each(
    server: InferenceServer, embedding: Runner, recorder: LatencyRecorder
) -> None:
    statuses: list[int] = []
    texts = ["a man is eating food", "the movie is awful", "bread"]

    def client(n: int) -> None:
        for i in range(25):
            status, body = post(server, {"text": texts[(n + i) % 3]})
            statuses.append(status)
            assert len(body["embeddings"][0]) == 4

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 200
    requests, errors, latency = recorder.drain()
    assert (requests, errors) == (200, 0) and latency is not None and latency.count == 200
