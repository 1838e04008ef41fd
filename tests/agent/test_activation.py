"""A/B activation: self-test before the switch, an atomic swap, probation and local rollback."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.config import ActivationConfig
from agent.contract import wire
from agent.core import Agent
from agent.runtime import ModelInfo, Runner
from agent.slots import load_slots
from agent.transfer import artifact_path
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import desired, final_state, make_agent, send_desired, states, wait_for
from tests.agent.models import (
    EMBEDDING_SPEC,
    write_batch_of_one_model,
    write_embedding_model,
    write_log_model,
    write_tensor_model,
    write_tokenizer,
)

SLOW_PROBATION = ActivationConfig(probation=300.0, max_error_rate=0.5, min_requests=4)


@pytest.fixture
def agent(tmp_path: Path, link: FakeLink) -> Iterator[Agent]:
    agent = make_agent(tmp_path / "data", link, activation=SLOW_PROBATION)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def first(agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path) -> wire.FileManifest:
    """Deployment 1, a tensor model y = Relu(x) + 1, active."""
    file = plane.add(write_tensor_model(tmp_path / "first.onnx"), "model")
    send_desired(link, desired(1, [file], version="1"))
    assert final_state(link, 1).state == "active"
    return file


def post(agent: Agent, payload: Any) -> tuple[int, Any]:
    assert agent.server is not None
    connection = http.client.HTTPConnection("127.0.0.1", agent.server.port, timeout=10)
    try:
        connection.request("POST", "/v1/infer", body=json.dumps(payload).encode())
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_it_activates_a_model_that_passes_its_selftest(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest
) -> None:
    selftest = wire.SelfTest(inputs=[{"x": [[1.0, -1.0, 0.5, 0.0]]}], outputs=[{"y": [[2.0, 1.0, 1.5, 1.0]]}])
    second = plane.add(write_tensor_model(agent.data_dir / "second.onnx"), "model")
    send_desired(link, desired(2, [second], version="2", selftest=selftest))
    assert final_state(link, 2).state == "active"
    assert agent.runner.info is not None and agent.runner.info.deployment_id == 2


def test_it_never_activates_a_model_that_fails_its_selftest(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest
) -> None:
    selftest = wire.SelfTest(
        inputs=[{"x": [[1.0, -1.0, 0.5, 0.0]]}], outputs=[{"y": [[2.0, 1.0, 1.6, 1.0]]}], max_abs_error=0.01
    )
    second = plane.add(write_tensor_model(agent.data_dir / "second.onnx"), "model")
    send_desired(link, desired(2, [second], version="2", selftest=selftest))
    report = final_state(link, 2)
    assert report.state == "failed"
    assert "self-test failed" in report.error and "case 0 output 'y': off by up to 0.1" in report.error
    assert "active" not in states(link, 2)
    assert agent.runner.info is not None and agent.runner.info.deployment_id == 1
    slots = load_slots(agent.data_dir)
    assert slots.active is not None and slots.active.deployment_id == 1


def test_it_fails_a_model_whose_smoke_inference_is_not_finite(
    agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path
) -> None:
    file = plane.add(write_log_model(tmp_path / "log.onnx"), "model")
    send_desired(link, desired(3, [file]))
    report = final_state(link, 3)
    assert report.state == "failed"
    assert "NaN or infinite" in report.error
    assert agent.runner.info is None


def test_it_checks_embeddings_within_the_shipped_cosine(
    agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path
) -> None:
    model_path, tokenizer_path = write_embedding_model(tmp_path / "e.onnx"), write_tokenizer(tmp_path / "t.json")
    reference = Runner()
    info = ModelInfo(deployment_id=0, sha256="0" * 64)
    reference.load(model_path, spec=EMBEDDING_SPEC, info=info, tokenizer_path=tokenizer_path)
    texts = ["a man is eating food", "the movie is awful"]
    expected = reference.embed(texts)
    files = [plane.add(model_path, "model"), plane.add(tokenizer_path, "tokenizer")]

    wrong = wire.SelfTest(texts=texts, embeddings=[expected[1], expected[0]], min_cosine=0.99)
    send_desired(link, desired(4, files, inference=EMBEDDING_SPEC, selftest=wrong))
    report = final_state(link, 4)
    assert report.state == "failed" and "text 0 ('a man is eating food'): cosine" in report.error

    right = wire.SelfTest(texts=texts, embeddings=expected, min_cosine=0.99)
    send_desired(link, desired(5, files, inference=EMBEDDING_SPEC, selftest=right))
    assert final_state(link, 5).state == "active"


def test_it_keeps_the_previous_slot_on_disk_and_in_slots_json(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest
) -> None:
    second = plane.add(write_tensor_model(agent.data_dir / "second.onnx"), "model")
    send_desired(link, desired(2, [second], version="2"))
    assert final_state(link, 2).state == "active"
    slots = msgspec.json.decode((agent.data_dir / "slots.json").read_bytes())
    current, previous = slots["current"], "a" if slots["current"] == "b" else "b"
    assert (slots[current]["deployment_id"], slots[previous]["deployment_id"]) == (2, 1)
    assert slots["healthy"] is False  # on probation
    assert artifact_path(agent.data_dir, first.sha256).is_file()
    assert msgspec.json.decode((agent.data_dir / "active.json").read_bytes())["deployment_id"] == 2


def test_it_keeps_on_disk_only_what_its_two_slots_run(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest
) -> None:
    later = [plane.add(write_tensor_model(agent.data_dir / f"v{n}.onnx"), "model") for n in (2, 3)]
    for number, file in enumerate(later, start=2):
        send_desired(link, desired(number, [file], version=str(number)))
        assert final_state(link, number).state == "active"

    stored = sorted(p.name for p in (agent.data_dir / "artifacts").iterdir())
    assert stored == sorted(name for f in later for name in (f.sha256, f.sha256 + ".manifest"))


def test_it_rolls_back_a_model_that_starts_failing_within_probation(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest, tmp_path: Path
) -> None:
    fragile = plane.add(write_batch_of_one_model(tmp_path / "fragile.onnx"), "model")
    send_desired(link, desired(2, [fragile], version="2"))
    assert final_state(link, 2).state == "active"  # its smoke test feeds a batch of one
    assert post(agent, {"inputs": {"x": [[1.0, 1.0, 1.0, 1.0]]}})[0] == 200
    for _ in range(4):
        assert post(agent, {"inputs": {"x": [[1.0] * 4, [2.0] * 4]}})[0] == 500
    report = wait_for(
        lambda: next((r for r in link.sent(wire.Channel.STATE) if r.state == "rolled_back"), None),
        what="a rolled_back report",
    )
    assert (report.deployment_id, report.sha256) == (2, fragile.sha256)
    assert "4 of 5 local inferences failed within probation (80%; the limit is 50%)" in report.error
    assert agent.runner.info is not None and agent.runner.info.deployment_id == 1
    slots = load_slots(agent.data_dir)
    assert slots.active is not None and slots.active.deployment_id == 1 and slots.healthy
    assert slots.rejected == [2]

    requested = len(plane.requested)
    send_desired(link, desired(2, [fragile], version="2"))  # the retained message, redelivered
    wait_for(lambda: states(link, 2).count("rolled_back") == 2, what="the refusal repeated")
    assert len(plane.requested) == requested
    assert agent.runner.info.deployment_id == 1


def test_it_does_not_count_a_callers_bad_input_against_the_model(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest
) -> None:
    for _ in range(6):
        assert post(agent, {"inputs": {"x": [[1.0, 2.0]]}})[0] == 400
    agent.check_probation()
    assert "rolled_back" not in [r.state for r in link.sent(wire.Channel.STATE)]
    assert agent.probation is not None


def test_it_marks_a_model_healthy_once_its_probation_is_over(tmp_path: Path, link: FakeLink, plane: FakePlane) -> None:
    agent = make_agent(tmp_path / "data", link, activation=ActivationConfig(probation=0.2))
    agent.start()
    try:
        file = plane.add(write_tensor_model(tmp_path / "m.onnx"), "model")
        send_desired(link, desired(1, [file]))
        assert final_state(link, 1).state == "active"
        wait_for(lambda: load_slots(agent.data_dir).healthy, what="the model to pass probation")
        assert agent.probation is None and load_slots(agent.data_dir).starts == 0
    finally:
        agent.stop()


def test_it_swaps_models_under_concurrent_requests_without_failing_one(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest, tmp_path: Path
) -> None:
    second = plane.add(write_tensor_model(tmp_path / "second.onnx"), "model")
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        assert agent.server is not None
        connection = http.client.HTTPConnection("127.0.0.1", agent.server.port, timeout=10)
        while not stop.is_set():
            connection.request("POST", "/v1/infer", body=b'{"inputs": {"x": [[1, 2, 3, 4]]}}')
            response = connection.getresponse()
            body = json.loads(response.read())
            results.append((response.status, body.get("version", body.get("error", ""))))
        connection.close()

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for deployment_id in range(2, 8):
            file, version = (second, "2") if deployment_id % 2 == 0 else (first, "1")
            send_desired(link, desired(deployment_id, [file], version=version))
            assert final_state(link, deployment_id).state == "active"
            wait_for(lambda v=version: any(r[1] == v for r in results[-4:]), what=f"requests served by {version}")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert [r for r in results if r[0] != 200] == []
    assert {v for _, v in results} == {"1", "2"}


def test_a_plane_rollback_to_an_older_version_leaves_no_fallback_to_the_withdrawn_one(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest, tmp_path: Path
) -> None:
    # Issue #13, item 15: version 3 runs; the plane sends the device to version 2, which it never held.
    third = plane.add(write_tensor_model(tmp_path / "third.onnx"), "model")
    send_desired(link, desired(3, [third], version="3"))
    assert final_state(link, 3).state == "active"
    older = plane.add(write_tensor_model(tmp_path / "older.onnx"), "model")
    send_desired(link, desired(4, [older], version="2"))
    assert final_state(link, 4).state == "active"

    slots = load_slots(agent.data_dir)
    assert slots.active is not None and slots.active.deployment_id == 4
    assert (slots.previous, slots.healthy) == (None, True)
    assert not artifact_path(agent.data_dir, third.sha256).exists()  # nothing left to go back to


def test_an_upgrade_keeps_the_version_it_replaces_as_the_fallback(
    agent: Agent, link: FakeLink, plane: FakePlane, first: wire.FileManifest, tmp_path: Path
) -> None:
    second = plane.add(write_tensor_model(tmp_path / "second.onnx"), "model")
    send_desired(link, desired(2, [second], version="2"))
    assert final_state(link, 2).state == "active"

    slots = load_slots(agent.data_dir)
    assert slots.previous is not None and slots.previous.deployment_id == 1
    assert slots.healthy is False  # on probation, with version 1 to go back to
