"""``edgefleet-agent status``: slot versions, a download's progress and the outbox, from status.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import status
from agent.__main__ import EXIT_FAILED, EXIT_OK, main
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import desired, final_state, make_agent, send_desired, wait_for
from tests.agent.models import write_tensor_model


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'device_id = "dev-1"\ndata_dir = "{tmp_path / "data"}"\n')
    return path


def test_it_shows_slots_download_and_outbox_of_the_running_agent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    link = FakeLink()
    plane = FakePlane(link)
    agent = make_agent(tmp_path / "data", link)
    agent.start()
    try:
        first = plane.add(write_tensor_model(tmp_path / "a.onnx"), "model")
        send_desired(link, desired(1, [first], model="tiny", version="1.0.0"))
        final_state(link, 1)
        plane.serve_limit = plane.served + 2  # the second download stalls part way
        second = plane.add(write_tensor_model(tmp_path / "b.onnx"), "model")
        send_desired(link, desired(2, [second], model="tiny", version="2.0.0"))
        wait_for(lambda: (s := status.load(agent.data_dir)).download and s.download.bytes_done, what="progress")
        assert main(["status", "--config", str(write_config(tmp_path))]) == EXIT_OK
    finally:
        agent.stop()
    out = capsys.readouterr().out
    assert "agent        running" in out
    assert "current      slot b: tiny 1.0.0 (deployment 1" in out and "[on probation" in out
    assert "previous     -" in out
    assert "download     deployment 2 tiny 2.0.0: 2048/" in out
    assert "outbox       0 queued, 0 dropped" in out


def test_it_prints_the_raw_status_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agent = make_agent(tmp_path / "data", FakeLink())
    agent.start()
    agent.stop()
    assert main(["status", "--json", "--config", str(write_config(tmp_path))]) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    assert (shown["device_id"], shown["current"], shown["outbox_depth"]) == ("dev-1", None, 0)


def test_it_says_so_when_the_agent_is_not_running(tmp_path: Path) -> None:
    agent = make_agent(tmp_path / "data", FakeLink())
    agent.start()
    agent.stop()
    snapshot = status.load(tmp_path / "data")
    assert "agent        NOT RUNNING" in status.describe(snapshot, now=snapshot.updated_at + 60)


def test_it_explains_a_missing_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--config", str(write_config(tmp_path))]) == EXIT_FAILED
    assert "the agent has not run with this config yet" in capsys.readouterr().err
