"""The agent refuses files the plane did not sign, before it fetches or activates anything."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import manifest, signing, wire
from agent.config import ConfigError, SecurityConfig, parse_config
from agent.core import Agent
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import desired, final_state, make_agent, send_desired
from tests.agent.models import write_tensor_model

PLANE_KEY = Ed25519PrivateKey.generate()
MODEL, VERSION = "tiny", "3"


def signed(file: wire.FileManifest, key: Ed25519PrivateKey = PLANE_KEY) -> wire.FileManifest:
    return msgspec.structs.replace(file, signature=signing.sign_manifest(key, file, model=MODEL, version=VERSION))


@pytest.fixture
def agent(tmp_path: Path, link: FakeLink) -> Iterator[Agent]:
    security = SecurityConfig(plane_public_key=signing.public_key_text(PLANE_KEY))
    agent = make_agent(tmp_path / "data", link, security=security)
    agent.start()
    yield agent
    agent.stop()


@pytest.fixture
def model_file(tmp_path: Path, plane: FakePlane) -> wire.FileManifest:
    return plane.add(write_tensor_model(tmp_path / "model.onnx"), "model", chunk_size=1024)


def deploy(link: FakeLink, deployment_id: int, file: wire.FileManifest) -> wire.StateReport:
    send_desired(link, desired(deployment_id, [file], model=MODEL, version=VERSION))
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
    send_desired(link, desired(7, [signed(model_file)], model=MODEL, version="4"))
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


def test_it_accepts_unsigned_files_with_a_warning_when_no_key_is_configured(
    tmp_path: Path, link: FakeLink, plane: FakePlane, model_file: wire.FileManifest, caplog: pytest.LogCaptureFixture
) -> None:
    agent = make_agent(tmp_path / "data", link)
    with caplog.at_level(logging.WARNING):
        agent.start()
        try:
            assert deploy(link, 7, model_file).state == "active"
        finally:
            agent.stop()
    assert "no security.plane_public_key is configured" in caplog.text
    assert "deployment.unverified deployment_id=7" in caplog.text


def test_it_refuses_a_config_with_a_bad_public_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="security.plane_public_key: the public key is 3 bytes"):
        parse_config(f'device_id = "d"\ndata_dir = "{tmp_path}"\n[security]\nplane_public_key = "YWJj"\n')


def test_it_signs_canonical_bytes_that_ignore_the_signature_field(model_file: wire.FileManifest) -> None:
    again = signed(model_file)
    assert manifest.canonical_manifest(model_file, model=MODEL, version=VERSION) == manifest.canonical_manifest(
        again, model=MODEL, version=VERSION
    )
    signing.verify_manifest(PLANE_KEY.public_key(), again, model=MODEL, version=VERSION)
