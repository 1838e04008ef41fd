"""OpenAI's chat completions API on the local server, with a fake generator: shape, streaming, limits."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from agent.config import GenerationConfig
from agent.runtime import Runner
from agent.server import InferenceServer
from agent.telemetry import GenerationRecorder, LatencyRecorder
from tests.agent.generators import FakeEngine, fake_generator
from tests.agent.helpers import wait_for
from tests.agent.models import EMBEDDING_SPEC, write_embedding_model, write_tokenizer
from tests.agent.test_server import INFO

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def runner(engine: FakeEngine) -> Runner:
    runner = Runner()
    runner.install(fake_generator(engine))
    return runner


@pytest.fixture
def generations() -> GenerationRecorder:
    return GenerationRecorder()


@pytest.fixture
def recorder() -> LatencyRecorder:
    return LatencyRecorder()


def start_server(runner: Runner, recorder: LatencyRecorder, **options: Any) -> InferenceServer:
    server = InferenceServer(runner, recorder, port=0, **options)
    server.start()
    return server


@pytest.fixture
def server(runner: Runner, recorder: LatencyRecorder, generations: GenerationRecorder) -> Iterator[InferenceServer]:
    server = start_server(runner, recorder, generations=generations)
    yield server
    server.stop()


def client(server: InferenceServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0, timeout=10)


def post(server: InferenceServer, payload: Any) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", "/v1/chat/completions", body=json.dumps(payload).encode())
    return connection.getresponse()


def test_it_answers_the_openai_client(server: InferenceServer, engine: FakeEngine) -> None:
    answer = client(server).chat.completions.create(model="tiny-lm", messages=QUESTION, temperature=0, max_tokens=32)
    assert answer.choices[0].message.content == " The capital of France is Paris."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == "tiny-lm" and answer.object == "chat.completion"
    assert answer.usage is not None and answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens == len(engine.prompts[0])
    assert engine.samplings[0].greedy and engine.samplings[0].max_tokens == 32


def test_it_streams_chunks_to_the_openai_client(server: InferenceServer) -> None:
    stream = client(server).chat.completions.create(
        model="tiny-lm", messages=QUESTION, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == " The capital of France is Paris."
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_it_sends_server_sent_events_ending_with_done(server: InferenceServer) -> None:
    response = post(server, {"messages": QUESTION, "stream": True, "max_tokens": 3})
    assert response.status == 200
    assert response.getheader("Content-Type") == "text/event-stream"
    assert response.getheader("Transfer-Encoding") == "chunked"
    events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": " The"},
        {"content": " capital"},
        {"content": " of"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_it_keeps_the_connection_alive_after_a_stream(server: InferenceServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    for _ in range(2):
        connection.request("POST", "/v1/chat/completions", body=json.dumps({"messages": QUESTION, "stream": True}))
        response = connection.getresponse()
        assert response.read().endswith(b"data: [DONE]\n\n")
    connection.close()


def test_it_stops_generating_when_the_client_disconnects_mid_stream(
    runner: Runner, recorder: LatencyRecorder, generations: GenerationRecorder
) -> None:
    engine = FakeEngine([9] * 1000, delay=0.005)
    runner.install(fake_generator(engine))
    server = start_server(runner, recorder, generations=generations)
    try:
        response = post(server, {"messages": QUESTION, "stream": True, "max_tokens": 1000})
        assert response.fp is not None
        response.fp.readline()
        wait_for(lambda: engine.produced >= 10, what="ten tokens")
        response.close()  # the client goes away
        wait_for(lambda: engine.running == 0, what="the generation to stop")
        stopped_at = engine.produced
        time.sleep(0.1)
        assert engine.produced == stopped_at < 100
        stats = wait_for(generations.drain, what="the generation's figures")
        assert stats.requests == 1 and stats.tokens == stopped_at
    finally:
        server.stop()


def test_it_stops_a_whole_answer_when_its_client_has_gone(
    runner: Runner, recorder: LatencyRecorder, generations: GenerationRecorder
) -> None:
    engine = FakeEngine([9] * 1000, delay=0.005)
    runner.install(fake_generator(engine))
    server = start_server(runner, recorder, generations=generations)
    try:
        sock = socket.create_connection(("127.0.0.1", server.port))
        body = json.dumps({"messages": QUESTION, "max_tokens": 1000}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: engine.produced >= 5, what="five tokens")
        sock.close()
        wait_for(lambda: engine.running == 0, what="the generation to stop")
        assert engine.produced < 100
    finally:
        server.stop()


def test_it_answers_429_with_retry_after_past_its_waiting_line(runner: Runner, recorder: LatencyRecorder) -> None:
    engine = FakeEngine([9] * 1000, delay=0.01)
    runner.install(fake_generator(engine))
    server = start_server(runner, recorder, generation=GenerationConfig(max_running=1, max_waiting=1))
    busy = {"messages": QUESTION, "max_tokens": 50}
    try:
        results: list[int] = []
        first = threading.Thread(target=lambda: results.append(post(server, busy).status))
        first.start()
        wait_for(lambda: engine.running == 1, what="the first generation")
        second = threading.Thread(target=lambda: results.append(post(server, busy).status))
        second.start()
        wait_for(lambda: server._httpd.queue.waiting == 1, what="the second request to wait")
        response = post(server, busy)
        assert response.status == 429
        assert 1 <= int(response.getheader("Retry-After") or 0) <= 60
        assert json.loads(response.read())["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            client(server).chat.completions.create(model="x", messages=QUESTION)  # type: ignore[arg-type]
        first.join()
        second.join()
        assert results == [200, 200]
    finally:
        server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_it_reports_a_model_that_fails_mid_generation_as_a_fault(
    server: InferenceServer, runner: Runner, recorder: LatencyRecorder, generations: GenerationRecorder, stream: bool
) -> None:
    runner.install(fake_generator(FakeEngine([9] * 50, fail_after=3)))
    response = post(server, {"messages": QUESTION, "stream": stream})
    body = response.read().decode()
    if stream:
        assert response.status == 200 and '"server_error"' in body and "[DONE]" not in body
    else:
        assert response.status == 500 and json.loads(body)["error"]["type"] == "server_error"
    assert recorder.totals() == (1, 1)  # probation counts it
    stats = generations.drain()
    assert stats is not None and (stats.requests, stats.errors, stats.tokens) == (1, 1, 3)


def test_it_lists_the_active_model(server: InferenceServer) -> None:
    assert [m.id for m in client(server).models.list()] == ["tiny-lm"]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role 'wizard'"),
        ({"messages": QUESTION, "temperature": 3}, "temperature"),
        ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
        ({"messages": QUESTION, "n": 2}, "$.n"),
        ({"messages": QUESTION, "seed": 2**40}, "$.seed"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "text only"),
        ({"messages": [{"role": "user", "content": "x " * 100}]}, "context holds 64"),
    ],
)
def test_it_answers_400_for_a_bad_chat_request(
    server: InferenceServer, generations: GenerationRecorder, payload: Any, error: str
) -> None:
    response = post(server, payload)
    assert response.status == 400
    assert error in json.loads(response.read())["error"]["message"]
    stats = generations.drain()
    assert stats is not None and (stats.requests, stats.errors) == (1, 1)


def test_it_sends_embedders_and_generators_each_to_their_own_path(
    server: InferenceServer, runner: Runner, tmp_path: Path
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.request("POST", "/v1/infer", body=b'{"text": "bread"}')
    response = connection.getresponse()
    assert response.status == 400 and "/v1/chat/completions" in json.loads(response.read())["error"]
    runner.load(
        write_embedding_model(tmp_path / "e.onnx"),
        spec=EMBEDDING_SPEC,
        info=INFO,
        tokenizer_path=write_tokenizer(tmp_path / "t.json"),
    )
    with pytest.raises(openai.BadRequestError, match="does not generate text"):
        client(server).chat.completions.create(model="x", messages=QUESTION)  # type: ignore[arg-type]


def test_it_records_time_to_first_token_and_decode_speed(
    server: InferenceServer, generations: GenerationRecorder
) -> None:
    for _ in range(3):
        client(server).chat.completions.create(model="tiny-lm", messages=QUESTION)  # type: ignore[arg-type]
    stats = generations.drain()
    assert stats is not None
    assert (stats.requests, stats.errors, stats.tokens) == (3, 0, 24)
    assert 0 < stats.ttft_p50_ms <= stats.ttft_p95_ms and stats.decode_tps_p50 > 0
    assert generations.drain() is None


# --- item 17 of #13: stalled clients must not hold a thread each ---------------------------


def test_it_holds_no_more_threads_than_its_connection_cap_for_stalled_clients(server: InferenceServer) -> None:
    before = threading.active_count()
    stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
    try:
        time.sleep(0.5)
        assert threading.active_count() - before <= 64
        assert server.connections <= 64
    finally:
        for sock in stalled:
            sock.close()


def test_it_closes_a_silent_connection_after_its_timeout(runner: Runner, recorder: LatencyRecorder) -> None:
    server = start_server(runner, recorder, timeout=0.3, max_connections=4)
    try:
        stalled = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        late = socket.create_connection(("127.0.0.1", server.port))
        assert late.recv(100).startswith(b"HTTP/1.1 503")  # every place is held by a silent client
        for sock in stalled:
            sock.settimeout(5)
            assert sock.recv(100) == b""  # closed by the server
        wait_for(lambda: server.connections == 0, what="the places to free")
        assert client(server).chat.completions.create(model="x", messages=QUESTION).choices  # type: ignore[arg-type]
    finally:
        server.stop()
