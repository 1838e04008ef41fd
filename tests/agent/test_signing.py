"""The agent refuses desired messages and files the plane did not sign, and desired messages older than
the last it accepted, before it fetches or activates anything."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.config import ConfigError, SecurityConfig, parse_config
from agent.contract import manifest, signing, wire
from agent.core import Agent
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import desired, final_state, make_agent, send_desired, states, wait_for
from tests.agent.models import write_tensor_model

PLANE_KEY = Ed25519PrivateKey.generate()
MODEL, VERSION = "tiny", "3"


SECURITY = SecurityConfig(plane_public_key=signing.public_key_text(PLANE_KEY))
SEQ = itertools.count(1)


def signed(file: wire.FileManifest, key: Ed25519PrivateKey = PLANE_KEY) -> wire.FileManifest:
    return msgspec.structs.replace(file, signature=signing.sign_manifest(key, file, model=MODEL, version=VERSION))


def signed_desired(
    deployment_id: int, files: list[wire.FileManifest], *, key: Ed25519PrivateKey = PLANE_KEY, **fields: object
) -> wire.Desired:
    fields = {"model": MODEL, "version": VERSION, "seq": next(SEQ), **fields}
    return signing.sign_desired(key, desired(deployment_id, files, **fields))


@pytest.fixture
def agent(tmp_path: Path, link: FakeLink) -> Iterator[Agent]:
    agent = make_agent(tmp_path / "data", link, security=SECURITY)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def model_file(tmp_path: Path, plane: FakePlane) -> wire.FileManifest:
    return plane.add(write_tensor_model(tmp_path / "model.onnx"), "model", chunk_size=1024)


def deploy(link: FakeLink, deployment_id: int, file: wire.FileManifest) -> wire.StateReport:
    send_desired(link, signed_desired(deployment_id, [file]))
    return final_state(link, deployment_id)


def test_it_activates_a_file_signed_by_its_plane(agent: Agent, link: FakeLink, model_file: wire.FileManifest) -> None:
    report = deploy(link, 7, signed(model_file))
    assert (report.state, report.sha256) == ("active", model_file.sha256)


def test_it_refuses_an_unsigned_file_and_fetches_nothing(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    report = deploy(link, 7, model_file)
    assert report.state == "failed"
    assert report.error.startswith("signature missing")
    assert plane.requested == []
    assert agent.runner.info is None


def test_it_refuses_a_manifest_signed_with_another_key(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    report = deploy(link, 7, signed(model_file, Ed25519PrivateKey.generate()))
    assert report.state == "failed"
    assert report.error.startswith("signature invalid")
    assert plane.requested == []
    assert agent.runner.info is None


@pytest.mark.parametrize(
    "change",
    [{"precision": "int4"}, {"filename": "other.onnx"}, {"role": "tokenizer"}],
    ids=["precision", "filename", "role"],
)
def test_it_refuses_a_signed_manifest_with_a_field_altered(
    agent: Agent, link: FakeLink, model_file: wire.FileManifest, change: dict
) -> None:
    report = deploy(link, 7, msgspec.structs.replace(signed(model_file), **change))
    assert report.state == "failed"
    assert "signature" in report.error


def test_it_refuses_a_signed_file_offered_as_another_version(
    agent: Agent, link: FakeLink, model_file: wire.FileManifest
) -> None:
    send_desired(link, signed_desired(7, [signed(model_file)], version="4"))
    report = final_state(link, 7)
    assert (report.state, report.error.startswith("signature invalid")) == ("failed", True)


def test_it_refuses_a_tampered_file_even_with_its_manifest_rehashed(
    agent: Agent, link: FakeLink, plane: FakePlane, tmp_path: Path, model_file: wire.FileManifest
) -> None:
    # One byte flipped, and the manifest rebuilt to match it: the plane's signature no longer covers it.
    original = tmp_path / "model.onnx"
    tampered = tmp_path / "tampered.onnx"
    data = bytearray(original.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    forged = plane.add(tampered, "model", chunk_size=1024)
    forged = msgspec.structs.replace(forged, filename=model_file.filename, signature=signed(model_file).signature)
    report = deploy(link, 7, forged)
    assert report.state == "failed"
    assert report.error.startswith("signature invalid")
    assert agent.runner.info is None


def test_it_refuses_a_tampered_file_served_under_a_signed_manifest(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    # The signature verifies, but the bytes served differ by one byte from the signed chunk hashes.
    file, data = plane.files[model_file.sha256]
    flipped = bytearray(data)
    flipped[100] ^= 0x01
    plane.files[model_file.sha256] = (file, bytes(flipped))
    report = deploy(link, 7, signed(model_file))
    assert report.state == "failed"
    assert "chunk" in report.error
    assert agent.runner.info is None


def test_it_accepts_unsigned_files_with_a_warning_only_when_the_config_allows_it(
    tmp_path: Path, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(tmp_path / "data", link, security=SecurityConfig(allow_unsigned=True))
    with caplog.at_level(logging.WARNING):
        agent.start()
        try:
            send_desired(link, desired(7, [model_file]))
            assert final_state(link, 7).state == "active"
        finally:
            agent.stop()
    assert "agent.UNVERIFIED_DEPLOYMENTS security.allow_unsigned is true" in caplog.text
    assert "deployment.UNVERIFIED deployment_id=7" in caplog.text


def test_it_refuses_every_deployment_when_no_key_is_configured(
    tmp_path: Path, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest, caplog: pytest.LogCaptureFixture
) -> None:
    # Issue #13, item 6: an empty plane_public_key used to mean "accept unsigned".
    agent = make_agent(tmp_path / "data", link, security=SecurityConfig())
    with caplog.at_level(logging.ERROR):
        agent.start()
        try:
            send_desired(link, desired(7, [model_file]))
            report = final_state(link, 7)
        finally:
            agent.stop()
    assert report.state == "failed"
    assert report.error.startswith("signature required: this agent has no security.plane_public_key")
    assert plane.requested == []
    assert agent.runner.info is None
    assert "agent.no_plane_key" in caplog.text


def test_a_config_without_a_key_refuses_unsigned_by_default(tmp_path: Path) -> None:
    config = parse_config(f'device_id = "d"\ndata_dir = "{tmp_path}"\n')
    assert (config.security.plane_public_key, config.security.allow_unsigned) == ("", False)


def test_it_refuses_a_config_that_allows_unsigned_beside_a_key(tmp_path: Path) -> None:
    key = signing.public_key_text(PLANE_KEY)
    with pytest.raises(ConfigError, match="security.allow_unsigned: must not be true with a plane_public_key"):
        parse_config(
            f'device_id = "d"\ndata_dir = "{tmp_path}"\n[security]\nplane_public_key = "{key}"\nallow_unsigned = true\n'
        )


# --- the whole desired message (issue #13, item 5) ------------------------------------------------


def test_it_refuses_an_unsigned_desired_message_and_fetches_nothing(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    send_desired(link, desired(7, [signed(model_file)], model=MODEL, version=VERSION, seq=next(SEQ)))
    report = final_state(link, 7)
    assert report.state == "failed"
    assert report.error.startswith("signature missing: the desired message is unsigned")
    assert plane.requested == []
    assert agent.runner.info is None


@pytest.mark.parametrize(
    "change",
    [
        {"inference": wire.InferenceSpec(task="embedding", pooling="cls")},
        {"selftest": wire.SelfTest(inputs=[{"x": [[0.0, 0.0, 0.0, 0.0]]}], outputs=[{"y": [[1.0, 1.0, 1.0, 1.0]]}])},
        {"providers": ["CUDAExecutionProvider"]},
        {"deployment_id": 8},
        {"seq": 10**12},
        {"issued_at": 1_800_000_000.0},
    ],
    ids=["inference", "selftest", "providers", "deployment_id", "seq", "issued_at"],
)
def test_it_refuses_a_signed_desired_message_with_a_field_altered(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest, change: dict
) -> None:
    altered = msgspec.structs.replace(signed_desired(7, [signed(model_file)]), **change)
    send_desired(link, altered)
    report = final_state(link, altered.deployment_id or 7)
    assert report.state == "failed"
    assert report.error.startswith("signature invalid on the desired message")
    assert plane.requested == []


def test_it_refuses_a_desired_message_signed_for_another_device(
    agent: Agent, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    theirs = msgspec.structs.replace(desired(7, [signed(model_file)], model=MODEL, version=VERSION), device_id="dev-2")
    relabelled = msgspec.structs.replace(signing.sign_desired(PLANE_KEY, theirs), device_id=agent.device_id)
    send_desired(link, relabelled)
    assert final_state(link, 7).error.startswith("signature invalid on the desired message")
    assert plane.requested == []


def test_it_refuses_a_replayed_older_desired_message_even_after_a_restart(
    tmp_path: Path, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest
) -> None:
    newer_file = plane.add(write_tensor_model(tmp_path / "newer.onnx"), "model", chunk_size=1024)
    old = signed_desired(1, [signed(model_file)])
    new = signed_desired(2, [signed(newer_file)])
    data_dir = tmp_path / "data"
    agent = make_agent(data_dir, link, security=SECURITY)
    agent.start()
    try:
        send_desired(link, old)
        assert final_state(link, 1).state == "active"
        send_desired(link, new)
        assert final_state(link, 2).state == "active"
        send_desired(link, old)  # the downgrade: an old message, validly signed, sent again
        _wait_refused(agent, 1)
    finally:
        agent.stop()
    again = make_agent(data_dir, link, security=SECURITY)
    again.start()
    try:
        send_desired(link, old)
        _wait_refused(again, 1)
        assert again.active is not None and again.active.deployment_id == 2
    finally:
        again.stop()
    assert states(link, 1).count("active") == 1
    assert msgspec.json.decode((data_dir / "desired.json").read_bytes())["seq"] == new.seq


def _wait_refused(agent: Agent, count: int) -> None:
    wait_for(lambda: agent.refused >= count, what="the desired message to be refused")
    assert agent.active is not None and agent.active.deployment_id == 2


def test_it_refuses_a_config_with_a_bad_public_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="security.plane_public_key: the public key is 3 bytes"):
        parse_config(f'device_id = "d"\ndata_dir = "{tmp_path}"\n[security]\nplane_public_key = "YWJj"\n')


def test_it_signs_canonical_bytes_that_ignore_the_signature_field(model_file: wire.FileManifest) -> None:
    again = signed(model_file)
    assert manifest.canonical_manifest(model_file, model=MODEL, version=VERSION) == manifest.canonical_manifest(
        again, model=MODEL, version=VERSION
    )
    signing.verify_manifest(PLANE_KEY.public_key(), again, model=MODEL, version=VERSION)
