from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest

from agent.contract import wire
from agent.core import Agent
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import (
    DEVICE,
    desired,
    final_state,
    make_agent,
    send_desired,
    states,
    wait_for,
)
from tests.agent.models import EMBEDDING_SPEC, write_embedding_model, write_tensor_model, write_tokenizer


@pytest.fixture
def model_file(tmp_path: Path, plane: FakePlane) -> wire.FileManifest:
    return plane.add(write_tensor_model(tmp_path / "model.onnx"), "model", chunk_size=1024)


def test_it_subscribes_and_says_hello_on_connect(agent: Agent, link: FakeLink) -> None:
    assert link.subscriptions == [f"fleet/{DEVICE}/desired", f"fleet/{DEVICE}/chunks/data"]
    (hello,) = link.sent(wire.Channel.HELLO)
    assert hello.name == "Lab box 1"
    assert hello.hardware.cpu_count >= 1
    assert "CPUExecutionProvider" in hello.hardware.providers
    assert hello.active is None


def test_it_says_hello_again_on_every_reconnect(agent: Agent, link: FakeLink) -> None:
    link.drop()
    link.reconnect()
    assert len(link.sent(wire.Channel.HELLO)) == 2
    assert link.subscriptions.count(f"fleet/{DEVICE}/desired") == 2


def test_it_writes_its_http_port(agent: Agent, tmp_path: Path) -> None:
    assert agent.server is not None
    assert (tmp_path / "data" / "http.port").read_text().strip() == str(agent.server.port)


def test_it_requests_chunks_for_a_desired_deployment(agent: Agent, link: FakeLink, tmp_path: Path) -> None:
    file = FakePlane(FakeLink()).add(write_tensor_model(tmp_path / "model.onnx"), "model")  # nobody answers
    send_desired(link, desired(7, [file]))
    request = wait_for(lambda: link.sent(wire.Channel.CHUNK_REQUEST), what="a chunk request")[0]
    assert (request.deployment_id, request.sha256, request.indexes[0]) == (7, file.sha256, 0)
    assert len(request.indexes) <= agent.config.transfer.window


def test_it_reaches_active_with_the_right_sha(
    agent: Agent, link: FakeLink, model_file: wire.FileManifest, tmp_path: Path
) -> None:
    send_desired(link, desired(7, [model_file]))
    report = final_state(link, 7)
    assert (report.state, report.sha256) == ("active", model_file.sha256)
    assert states(link, 7)[0] == "downloading"
    assert "verifying" in states(link, 7)
    assert agent.runner.run({"x": [[1.0, -1.0, 0.0, 0.0]]}) == {"y": [[2.0, 1.0, 1.0, 1.0]]}
    saved = msgspec.json.decode((tmp_path / "data" / "active.json").read_bytes())
    assert (saved["deployment_id"], saved["sha256"]) == (7, model_file.sha256)
    assert (tmp_path / "data" / "artifacts" / model_file.sha256).is_file()


def test_it_deploys_an_embedding_model_with_its_tokenizer(
    agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path
) -> None:
    model = plane.add(write_embedding_model(tmp_path / "e.onnx"), "model")
    tokenizer = plane.add(write_tokenizer(tmp_path / "tokenizer.json"), "tokenizer")
    send_desired(link, desired(8, [model, tokenizer], inference=EMBEDDING_SPEC))
    assert final_state(link, 8).state == "active"
    assert len(agent.runner.embed(["a man is eating"])[0]) == 4


def test_it_detects_a_corrupted_chunk_and_fetches_it_again(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    plane.corrupt = {(model_file.sha256, 0)}
    send_desired(link, desired(7, [model_file]))
    assert final_state(link, 7).state == "active"
    assert plane.indexes_requested(model_file.sha256).count(0) == 2


def test_it_fails_the_deployment_with_the_planes_reason(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    plane.refuse[model_file.sha256] = "artifact is quarantined"
    send_desired(link, desired(7, [model_file]))
    report = final_state(link, 7)
    assert report.state == "failed"
    assert "artifact is quarantined" in report.error
    assert agent.runner.info is None


def test_it_fails_a_model_that_will_not_load(agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not onnx" * 100)
    send_desired(link, desired(9, [plane.add(junk, "model")]))
    report = final_state(link, 9)
    assert report.state == "failed"
    assert "onnxruntime cannot load" in report.error


def test_it_resumes_after_restart_without_fetching_verified_chunks_again(
    tmp_path: Path, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    plane.serve_limit = 3
    first = make_agent(tmp_path / "data", link)
    first.start()
    send_desired(link, desired(7, [model_file]))
    wait_for(lambda: plane.served >= 3, what="three chunks served")
    wait_for(lambda: len(plane.requested) > 3, what="the agent to ask for more")
    first.stop()

    second_link = FakeLink()
    second_plane = FakePlane(second_link)
    second_plane.files = plane.files
    second = make_agent(tmp_path / "data", second_link)
    second.start()
    try:
        send_desired(second_link, desired(7, [model_file]))
        assert final_state(second_link, 7).state == "active"
    finally:
        second.stop()
    fetched_twice = set(plane.indexes_requested(model_file.sha256)[:3]) & set(
        second_plane.indexes_requested(model_file.sha256)
    )
    assert fetched_twice == set()
    assert len(second_plane.indexes_requested(model_file.sha256)) == len(model_file.chunks) - 3


def test_it_loads_its_model_at_startup_without_network(
    tmp_path: Path, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    first = make_agent(tmp_path / "data", link)
    first.start()
    send_desired(link, desired(7, [model_file]))
    final_state(link, 7)
    first.stop()

    offline = FakeLink()
    offline.connect = lambda: None  # type: ignore[method-assign]  # the broker is unreachable
    second = make_agent(tmp_path / "data", offline)
    second.start()
    try:
        assert second.runner.info is not None and second.runner.info.sha256 == model_file.sha256
        assert second.active is not None and second.active.deployment_id == 7
    finally:
        second.stop()


def test_it_reports_active_at_once_when_the_model_is_already_running(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    send_desired(link, desired(7, [model_file]))
    final_state(link, 7)
    requested = len(plane.requested)
    send_desired(link, desired(11, [model_file]))
    report = final_state(link, 11)
    assert (report.state, report.sha256) == ("active", model_file.sha256)
    assert len(plane.requested) == requested
    assert agent.active is not None and agent.active.deployment_id == 11
    link.reconnect()
    assert link.sent(wire.Channel.HELLO)[-1].active == wire.ActiveModel(deployment_id=11, sha256=model_file.sha256)


def test_it_drops_an_older_deployment_for_a_newer_one(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest, tmp_path: Path
) -> None:
    plane.serve_limit = 0  # the first deployment never gets a chunk
    send_desired(link, desired(7, [model_file]))
    wait_for(lambda: plane.requested, what="a first chunk request")
    newer = plane.add(write_embedding_model(tmp_path / "e.onnx"), "model")
    tokenizer = plane.add(write_tokenizer(tmp_path / "tokenizer.json"), "tokenizer")
    plane.serve_limit = None
    send_desired(link, desired(8, [newer, tokenizer], inference=EMBEDDING_SPEC))
    assert final_state(link, 8).state == "active"
    assert "active" not in states(link, 7) and "failed" not in states(link, 7)
    assert agent.runner.info is not None and agent.runner.info.deployment_id == 8


def test_it_survives_malformed_messages(agent: Agent, link: FakeLink, model_file: wire.FileManifest) -> None:
    topic = wire.topic(DEVICE, wire.Channel.DESIRED)
    link.inject(topic, b"{not json")
    link.inject(topic, b'{"v": 99, "device_id": "dev-1", "deployment_id": 1, "issued_at": 0}')
    link.inject(topic, wire.encode(desired(5, [model_file])).replace(b'"dev-1"', b'"dev-2"'))
    link.inject(wire.topic(DEVICE, wire.Channel.CHUNK_DATA), b"short")
    wait_for(lambda: agent.malformed == 4, what="four malformed messages counted")
    send_desired(link, desired(7, [model_file]))
    assert final_state(link, 7).state == "active"


def test_it_ignores_a_desired_without_a_deployment(agent: Agent, link: FakeLink) -> None:
    send_desired(link, desired(None, []))
    link.inject(wire.topic(DEVICE, wire.Channel.DESIRED), b"")  # a cleared retained message
    link.inject(wire.topic(DEVICE, wire.Channel.CHUNK_DATA), b"short")
    wait_for(lambda: agent.malformed == 1, what="the marker message")
    assert link.sent(wire.Channel.STATE) == []


def test_it_sends_a_heartbeat_soon_after_start(tmp_path: Path, link: FakeLink) -> None:
    agent = make_agent(tmp_path / "data", link, heartbeat_interval=0.2)
    agent.start()
    try:
        agent.recorder.record(12.0, ok=True)
        agent.recorder.record(30.0, ok=False)
        beats: list[wire.Heartbeat] = wait_for(
            lambda: link.sent(wire.Channel.HEARTBEAT)[1:] and link.sent(wire.Channel.HEARTBEAT)
        )
    finally:
        agent.stop()
    first = beats[0]
    assert (first.seq, first.requests, first.errors, first.interval_s) == (1, 2, 1, 0.2)
    assert first.latency is not None and first.latency.count == 1
    assert first.mem_rss_bytes > 0
    assert beats[1].seq == 2 and beats[1].requests == 0


def test_it_says_goodbye_and_disconnects_on_stop(tmp_path: Path, link: FakeLink) -> None:
    agent = make_agent(tmp_path / "data", link)
    agent.start()
    agent.stop()
    assert link.closed
    assert link.farewell is not None
    assert link.farewell.topic == f"fleet/{DEVICE}/presence"
    goodbye = wire.decode(wire.Channel.PRESENCE, link.farewell.payload)
    assert goodbye == wire.Presence(device_id=DEVICE, online=False, reason="shutdown")


def test_it_repeats_hello_until_the_plane_answers(tmp_path: Path, link: FakeLink) -> None:
    agent = make_agent(tmp_path / "data", link)
    agent.hello_retry = (0.05, 0.1)
    agent.start()
    try:
        wait_for(lambda: len(link.sent(wire.Channel.HELLO)) >= 3, what="hello repeated")
        send_desired(link, wire.Desired(device_id=DEVICE, deployment_id=None, issued_at=1.0))
        wait_for(agent.heard_from_plane.is_set, what="the plane's answer")
        answered_at = len(link.sent(wire.Channel.HELLO))

        time.sleep(0.3)

        assert len(link.sent(wire.Channel.HELLO)) == answered_at
    finally:
        agent.stop()
