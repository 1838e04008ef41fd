"""Admission: a device that cannot take a version says so, with the reason, and downloads nothing."""

from __future__ import annotations

from pathlib import Path

from agent import admission
from agent.config import AdmissionConfig
from agent.contract import wire
from agent.core import Agent
from agent.transfer import artifact_path
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import desired, final_state, send_desired, states
from tests.agent.models import write_tensor_model

MIB = 1024 * 1024
PLENTY = admission.Resources(
    disk_free_bytes=100 * 1024 * MIB, ram_available_bytes=100 * 1024 * MIB, providers=["CPUExecutionProvider"]
)


def manifest(size: int, role: wire.FileRole = "model", sha: str = "a") -> wire.FileManifest:
    chunk = 4 * MIB
    return wire.FileManifest(
        role=role,
        filename="m.onnx",
        sha256=sha * 64,
        size=size,
        chunk_size=chunk,
        chunks=[sha * 64] * -(-size // chunk),
    )


def refusal(want: wire.Desired, have: admission.Resources, data_dir: Path) -> str | None:
    return admission.refusal(want, data_dir, have, AdmissionConfig())


def test_it_admits_a_version_the_device_has_room_for(tmp_path: Path) -> None:
    assert refusal(desired(1, [manifest(100 * MIB)]), PLENTY, tmp_path) is None


def test_it_wants_twice_the_artifact_in_free_disk(tmp_path: Path) -> None:
    have = admission.Resources(disk_free_bytes=150 * MIB, ram_available_bytes=PLENTY.ram_available_bytes, providers=[])
    reason = refusal(desired(1, [manifest(100 * MIB)]), have, tmp_path)
    assert reason is not None
    assert "needs 200.0 MiB of free disk" in reason and "150.0 MiB free" in reason


def test_it_needs_no_disk_for_files_it_already_stores(tmp_path: Path) -> None:
    stored = artifact_path(tmp_path, "a" * 64)
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"x")
    have = admission.Resources(disk_free_bytes=1, ram_available_bytes=PLENTY.ram_available_bytes, providers=[])
    assert refusal(desired(1, [manifest(100 * MIB)]), have, tmp_path) is None


def test_it_wants_ram_for_twice_the_model_plus_a_margin(tmp_path: Path) -> None:
    tokenizer = manifest(500 * MIB, role="tokenizer", sha="b")  # a tokenizer's size does not count
    want = desired(1, [manifest(100 * MIB), tokenizer])
    enough = admission.Resources(disk_free_bytes=0, ram_available_bytes=264 * MIB, providers=[])
    short = admission.Resources(disk_free_bytes=0, ram_available_bytes=263 * MIB, providers=[])
    assert refusal(want, enough, tmp_path) is None
    reason = refusal(want, short, tmp_path)
    assert reason is not None and "needs 264.0 MiB of available RAM to load a 100.0 MiB model" in reason


def test_it_wants_every_required_execution_provider(tmp_path: Path) -> None:
    want = desired(1, [manifest(MIB)], providers=["CPUExecutionProvider", "CoreMLExecutionProvider"])
    reason = refusal(want, PLENTY, tmp_path)
    assert reason is not None
    assert reason.startswith("needs execution provider CoreMLExecutionProvider; this device has CPUExecutionProvider")


def test_it_reports_ineligible_and_fetches_nothing_without_the_provider(
    agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path
) -> None:
    file = plane.add(write_tensor_model(tmp_path / "model.onnx"), "model")
    send_desired(link, desired(7, [file], providers=["NoSuchExecutionProvider"]))
    report = final_state(link, 7)
    assert report.state == "ineligible"
    assert "NoSuchExecutionProvider" in report.error
    assert plane.requested == []
    assert states(link, 7) == ["ineligible"]
    assert list((tmp_path / "data" / "downloads").iterdir()) == []
    assert agent.runner.info is None


def test_it_reports_ineligible_when_the_disk_is_short(
    agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path
) -> None:
    agent.measure = lambda data_dir: admission.Resources(disk_free_bytes=10, ram_available_bytes=0, providers=[])
    file = plane.add(write_tensor_model(tmp_path / "model.onnx"), "model")
    send_desired(link, desired(7, [file]))
    report = final_state(link, 7)
    assert report.state == "ineligible"
    assert "free disk" in report.error and "Free some space" in report.error
    assert plane.requested == []


def test_it_reports_ineligible_when_ram_is_short(
    agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path
) -> None:
    agent.measure = lambda data_dir: admission.Resources(disk_free_bytes=0, ram_available_bytes=MIB, providers=[])
    file = plane.add(write_tensor_model(tmp_path / "model.onnx"), "model")
    send_desired(link, desired(7, [file]))
    report = final_state(link, 7)
    assert report.state == "ineligible"
    assert "available RAM" in report.error
    assert plane.requested == []
