"""Fault tests against a real Mosquitto: kill -9 mid-download, a broker restart, a chunk corrupted in transit,
an agent that keeps dying with its new model, a model that fails its self-test, and one that fails in service."""

from __future__ import annotations

import http.client
import json
import os
import signal
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent import status
from agent.clock import SystemClock
from agent.config import ActivationConfig, SecurityConfig, TransferConfig
from agent.contract import manifest, signing, wire
from agent.core import Agent
from agent.mqtt import MqttLink, Will
from agent.runtime import Runner
from agent.transfer import artifact_path
from tests import support
from tests.agent.chunkserver import ChunkServer
from tests.agent.fakes import FakeLink, FakePlane
from tests.agent.helpers import desired, final_state, make_agent, make_config, send_desired, wait_for
from tests.agent.models import write_batch_of_one_model, write_tensor_model

REPO = Path(__file__).resolve().parents[2]
CHUNK = 16 * 1024

pytestmark = pytest.mark.timeout(120)


def unique_device() -> str:
    return f"fault-{uuid.uuid4().hex[:10]}"


def write_config(
    path: Path, device_id: str, broker: wire.BrokerUrl, data_dir: Path, extra: str = "", *, window: int = 8
) -> Path:
    path.write_text(
        f'device_id = "{device_id}"\n'
        f'broker_url = "mqtt://{broker.host}:{broker.port}"\n'
        f'data_dir = "{data_dir}"\n'
        "[http]\nport = 0\n"
        f"[transfer]\nwindow = {window}\nstall_timeout = 10.0\n"
        "[security]\nallow_unsigned = true\n" + extra  # the stand-in plane signs nothing
    )
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as stream:
        return subprocess.Popen([sys.executable, "-m", "agent", "--config", str(config)], cwd=REPO, stderr=stream)


def real_link(broker: wire.BrokerUrl, device_id: str) -> MqttLink:
    return MqttLink(broker, client_id=device_id, will=Will(wire.topic(device_id, wire.Channel.PRESENCE), b""))


def new_desired(device_id: str, deployment_id: int, files: list[wire.FileManifest]) -> wire.Desired:
    return wire.Desired(device_id=device_id, deployment_id=deployment_id, files=files, issued_at=time.time())


@pytest.fixture
def big_model(tmp_path: Path) -> Path:
    return write_tensor_model(tmp_path / "big.onnx", ballast_bytes=2 * 1024 * 1024)


@pytest.fixture
def server(broker: wire.BrokerUrl) -> Iterator[ChunkServer]:
    server = ChunkServer(broker, delay=0.01).start()
    yield server
    server.stop()


def test_it_resumes_after_kill_9_without_fetching_a_verified_chunk_again(
    tmp_path: Path, broker: wire.BrokerUrl, server: ChunkServer, big_model: Path
) -> None:
    device_id = unique_device()
    file = server.add(big_model, chunk_size=CHUNK)
    server.publish_desired(new_desired(device_id, 42, [file]))
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "agent.toml", device_id, broker, data_dir)
    log = tmp_path / "agent.log"

    agent = start_agent(config, log)
    try:
        wait_for(lambda: len(server.served) >= len(file.chunks) // 2, timeout=30, what="half the chunks served")
        agent.send_signal(signal.SIGKILL)
        agent.wait(10)
    finally:
        agent.kill()
    server.wait_idle()  # replies to requests the dead agent left behind still go out; count them as its own
    journal = (data_dir / "downloads" / f"{file.sha256}.journal").read_bytes()
    verified = {index for (index,) in struct.iter_unpack(">I", journal)}
    assert 0 < len(verified) < len(file.chunks)
    first_run = len(server.served)
    assert not artifact_path(data_dir, file.sha256).exists()

    agent = start_agent(config, log)
    try:
        wait_for(lambda: server.state_of(42) == "active", timeout=60, what="the restarted agent to reach active")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
    second_run = server.served[first_run:]
    fetched_again = {index for _, index in second_run} & verified
    assert fetched_again == set(), f"verified chunks fetched twice: {sorted(fetched_again)}"
    verified_bytes = sum(manifest.chunk_span(i, file.size, file.chunk_size)[1] for i in verified)
    second_bytes = sum(manifest.chunk_span(i, file.size, file.chunk_size)[1] for _, i in second_run)
    assert second_bytes == file.size - verified_bytes
    assert manifest.file_sha256(artifact_path(data_dir, file.sha256)) == file.sha256


FULL_SPEED_BYTES = 90 * 1024 * 1024  # the size of the fp32 MiniLM
FULL_SPEED_CHUNK = 256 * 1024  # the plane's default chunk size


def test_it_fetches_again_at_most_the_window_after_kill_9_at_full_speed(tmp_path: Path, broker: wire.BrokerUrl) -> None:
    """Issue #13, item 16: counted as the plane serves them, not as the agent records them."""
    server = ChunkServer(broker).start()  # no delay: the pull runs as fast as broker and agent go
    device_id = unique_device()
    file = server.add(write_tensor_model(tmp_path / "big.onnx", FULL_SPEED_BYTES), chunk_size=FULL_SPEED_CHUNK)
    server.publish_desired(new_desired(device_id, 43, [file]))
    data_dir = tmp_path / "data"
    window = TransferConfig().window
    wire_count = support.TcpProxy(broker.port)  # the agent's connection: what the broker delivered to it
    via_proxy = wire.BrokerUrl(host="127.0.0.1", port=wire_count.port)
    config = write_config(tmp_path / "agent.toml", device_id, via_proxy, data_dir, window=window)
    log = tmp_path / "agent.log"
    try:
        agent = start_agent(config, log)
        try:
            wait_for(lambda: server.served_bytes >= file.size // 2, timeout=60, what="half the file served")
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
        finally:
            agent.kill()
        server.wait_idle()  # replies to the dead agent's requests still go out: they count as fetched
        first_run = server.served_bytes
        assert first_run < file.size

        agent = start_agent(config, log)
        try:
            wait_for(lambda: server.state_of(43) == "active", timeout=90, what="the restarted agent to reach active")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(10)
    finally:
        server.stop()
        wire_count.close()
    fetched_again = server.served_bytes - file.size
    assert fetched_again <= window * FULL_SPEED_CHUNK, (
        f"killed at {first_run / file.size:.0%}: {fetched_again} bytes ({fetched_again / file.size:.1%}) "
        f"fetched again, more than the window of {window} chunks"
    )
    # On the wire: the file once, what was in flight at the kill, and MQTT's framing (well under 1%).
    assert wire_count.delivered - file.size <= window * FULL_SPEED_CHUNK + file.size // 100
    assert manifest.file_sha256(artifact_path(data_dir, file.sha256)) == file.sha256


def test_it_refuses_a_replayed_signed_desired_message_retained_on_a_real_broker(
    tmp_path: Path, broker: wire.BrokerUrl
) -> None:
    """Issue #13, item 5: an old desired message, validly signed, retained again on the broker (a replay, or a
    broker restored from a backup) must not take the device back to the version it replaced, even across restarts.
    """
    key = Ed25519PrivateKey.generate()
    security = SecurityConfig(plane_public_key=signing.public_key_text(key))
    server = ChunkServer(broker).start()
    device_id = unique_device()
    files = []
    for name in ("old", "new"):
        file = server.add(write_tensor_model(tmp_path / f"{name}.onnx"))
        files.append(msgspec.structs.replace(file, signature=signing.sign_manifest(key, file, model="", version="")))
    old = signing.sign_desired(key, msgspec.structs.replace(new_desired(device_id, 1, [files[0]]), seq=100))
    new = signing.sign_desired(key, msgspec.structs.replace(new_desired(device_id, 2, [files[1]]), seq=200))
    config = make_config(tmp_path / "data", device_id=device_id, security=security)
    try:
        agent = Agent(config, real_link(broker, device_id), Runner(), SystemClock())
        agent.start()
        try:
            for message in (old, new):
                server.publish_desired(message)
                wait_for(lambda m=message: server.state_of(m.deployment_id) == "active", timeout=30, what="active")
            server.publish_desired(old)  # the replay
            wait_for(lambda: agent.refused == 1, timeout=10, what="the replay refused")
        finally:
            agent.stop()
        again = Agent(config, real_link(broker, device_id), Runner(), SystemClock())
        again.start()  # the broker hands it the retained replay at once
        try:
            wait_for(lambda: again.refused == 1, timeout=10, what="the retained replay refused after a restart")
            assert again.active is not None and again.active.deployment_id == 2
        finally:
            again.stop()
    finally:
        server.stop()
    assert [r.state for r in server.states if r.deployment_id == 1].count("active") == 1


def test_it_completes_a_transfer_across_a_broker_restart(tmp_path: Path, big_model: Path) -> None:
    with support.broker(tmp_path / "broker") as mosquitto:
        url = wire.BrokerUrl(host="127.0.0.1", port=mosquitto.port)
        server = ChunkServer(url, delay=0.01).start()
        device_id = unique_device()
        file = server.add(big_model, chunk_size=CHUNK)
        config = make_config(
            tmp_path / "data", device_id=device_id, transfer=TransferConfig(window=8, stall_timeout=5.0)
        )
        agent = Agent(config, real_link(url, device_id), Runner(), SystemClock())
        agent.start()
        try:
            agent.on_desired(new_desired(device_id, 7, [file]))
            wait_for(lambda: len(server.served) >= len(file.chunks) // 3, timeout=30, what="a third served")
            mosquitto.restart(down_for=0.5)
            assert len(server.served) < len(file.chunks)
            wait_for(lambda: agent.active is not None, timeout=60, what="the model to become active")
            wait_for(lambda: server.state_of(7) == "active", timeout=30, what="the active report to reach the plane")
        finally:
            agent.stop()
            server.stop()
    assert agent.active is not None and agent.active.sha256 == file.sha256
    assert manifest.file_sha256(artifact_path(tmp_path / "data", file.sha256)) == file.sha256


def test_it_fetches_again_a_chunk_corrupted_in_transit_over_a_real_broker(
    tmp_path: Path, broker: wire.BrokerUrl, big_model: Path
) -> None:
    server = ChunkServer(broker).start()
    device_id = unique_device()
    file = server.add(big_model, chunk_size=CHUNK)
    server.corrupt = {(file.sha256, 5)}
    agent = Agent(
        make_config(tmp_path / "data", device_id=device_id), real_link(broker, device_id), Runner(), SystemClock()
    )
    agent.start()
    try:
        agent.on_desired(new_desired(device_id, 9, [file]))
        wait_for(lambda: agent.active is not None, timeout=30, what="the model to become active")
    finally:
        agent.stop()
        server.stop()
    assert server.indexes(file.sha256).count(5) == 2
    assert manifest.file_sha256(artifact_path(tmp_path / "data", file.sha256)) == file.sha256


def test_it_rolls_back_at_start_up_after_a_crash_loop_with_the_new_model(
    tmp_path: Path, broker: wire.BrokerUrl
) -> None:
    device_id = unique_device()
    data_dir = tmp_path / "data"
    activation = ActivationConfig(probation=300.0, max_crashes=2)
    link = FakeLink()
    plane = FakePlane(link)
    setup = make_agent(data_dir, link, device_id=device_id, activation=activation)
    setup.start()
    try:
        old = plane.add(write_tensor_model(tmp_path / "old.onnx"), "model")
        new = plane.add(write_tensor_model(tmp_path / "new.onnx"), "model")
        send_desired(link, msgspec.structs.replace(desired(1, [old], version="1"), device_id=device_id))
        assert final_state(link, 1).state == "active"
        send_desired(link, msgspec.structs.replace(desired(2, [new], version="2"), device_id=device_id))
        assert final_state(link, 2).state == "active"
    finally:
        setup.stop()  # a clean stop: the new model is on probation, but this start does not count as a crash

    watcher = ChunkServer(broker).start()  # only to collect the state reports
    config = write_config(
        tmp_path / "agent.toml", device_id, broker, data_dir, "[activation]\nprobation = 300.0\nmax_crashes = 2\n"
    )
    log = tmp_path / "agent.log"
    try:
        for _ in range(2):
            agent = start_agent(config, log)
            wait_for(lambda pid=agent.pid: _serving(data_dir, pid), timeout=30, what="the agent up with a model")
            assert status.load(data_dir).current.deployment_id == 2  # type: ignore[union-attr]
            os.kill(agent.pid, signal.SIGKILL)
            agent.wait(10)
        agent = start_agent(config, log)
        try:
            wait_for(lambda: _serving(data_dir, agent.pid), timeout=30, what="the agent up after the crash loop")
            assert status.load(data_dir).current.deployment_id == 1  # type: ignore[union-attr]
            wait_for(lambda: watcher.state_of(2) == "rolled_back", timeout=30, what="the rolled_back report")
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(10)
    finally:
        watcher.stop()
    report = next(r for r in watcher.states if r.deployment_id == 2 and r.state == "rolled_back")
    assert "died 2 times with this version" in report.error and "crash loop" in report.error


def test_a_plane_rollback_is_never_undone_by_a_crash_loop_at_start_up(tmp_path: Path, broker: wire.BrokerUrl) -> None:
    """Issue #13, item 15: the plane moves a device back from version 2 to version 1. The agent then dies
    at start-up with version 1 (as often as a crash loop takes); it must not go back to the withdrawn 2."""
    device_id = unique_device()
    data_dir = tmp_path / "data"
    link = FakeLink()
    plane = FakePlane(link)
    setup = make_agent(data_dir, link, device_id=device_id, activation=ActivationConfig(probation=300.0))
    setup.start()
    try:
        good = plane.add(write_tensor_model(tmp_path / "good.onnx"), "model")
        bad = plane.add(write_tensor_model(tmp_path / "bad.onnx"), "model")
        send_desired(link, msgspec.structs.replace(desired(1, [good], version="1"), device_id=device_id))
        assert final_state(link, 1).state == "active"
        send_desired(link, msgspec.structs.replace(desired(2, [bad], version="2"), device_id=device_id))
        assert final_state(link, 2).state == "active"
        # The plane rolls the device back (a slow canary, or an operator): version 1 again, a new deployment.
        send_desired(link, msgspec.structs.replace(desired(3, [good], version="1"), device_id=device_id))
        assert final_state(link, 3).state == "active"
    finally:
        setup.stop()

    watcher = ChunkServer(broker).start()  # only to collect the state reports
    config = write_config(
        tmp_path / "agent.toml", device_id, broker, data_dir, "[activation]\nprobation = 300.0\nmax_crashes = 2\n"
    )
    log = tmp_path / "agent.log"
    try:
        for _ in range(3):
            agent = start_agent(config, log)
            try:
                wait_for(lambda pid=agent.pid: _serving(data_dir, pid), timeout=30, what="the agent up with a model")
                assert status.load(data_dir).current.deployment_id == 3  # type: ignore[union-attr]
            finally:
                agent.kill()  # SIGKILL: a crash, as far as probation can tell
                agent.wait(10)
        agent = start_agent(config, log)
        try:
            wait_for(lambda: _serving(data_dir, agent.pid), timeout=30, what="the agent up after the restarts")
            assert status.load(data_dir).current.deployment_id == 3  # type: ignore[union-attr]
        finally:
            agent.send_signal(signal.SIGTERM)
            agent.wait(10)
    finally:
        watcher.stop()
    assert [r for r in watcher.states if r.state == "rolled_back"] == []


def _serving(data_dir: Path, pid: int) -> bool:
    try:
        snapshot = status.load(data_dir)
    except (OSError, msgspec.DecodeError):
        return False
    return snapshot.pid == pid and snapshot.current is not None


@pytest.fixture
def running(tmp_path: Path, broker: wire.BrokerUrl) -> Iterator[tuple[Agent, ChunkServer]]:
    """A real agent on the real broker with deployment 1 (y = Relu(x) + 1) active, and the plane stand-in."""
    server = ChunkServer(broker).start()
    device_id = unique_device()
    activation = ActivationConfig(probation=300.0, max_error_rate=0.5, min_requests=4)
    config = make_config(tmp_path / "data", device_id=device_id, activation=activation)
    agent = Agent(config, real_link(broker, device_id), Runner(), SystemClock())
    agent.start()
    try:
        first = server.add(write_tensor_model(tmp_path / "first.onnx"))
        agent.on_desired(new_desired(device_id, 1, [first]))
        wait_for(lambda: server.state_of(1) == "active", timeout=30, what="deployment 1 active")
        yield agent, server
    finally:
        agent.stop()
        server.stop()


def test_a_model_that_fails_its_selftest_never_becomes_active_over_a_real_broker(
    running: tuple[Agent, ChunkServer], tmp_path: Path
) -> None:
    agent, server = running
    second = server.add(write_tensor_model(tmp_path / "second.onnx"))
    selftest = wire.SelfTest(
        inputs=[{"x": [[1.0, -1.0, 0.5, 0.0]]}], outputs=[{"y": [[2.0, 1.0, 1.6, 1.0]]}], max_abs_error=0.01
    )
    message = msgspec.structs.replace(new_desired(agent.config.device_id, 2, [second]), selftest=selftest)

    agent.on_desired(message)

    wait_for(lambda: server.state_of(2) == "failed", timeout=30, what="the failed report")
    assert "active" not in [r.state for r in server.states if r.deployment_id == 2]
    assert agent.runner.info is not None and agent.runner.info.deployment_id == 1


def test_a_model_that_starts_failing_is_rolled_back_within_probation_over_a_real_broker(
    running: tuple[Agent, ChunkServer], tmp_path: Path
) -> None:
    agent, server = running
    fragile = server.add(write_batch_of_one_model(tmp_path / "fragile.onnx"))
    agent.on_desired(new_desired(agent.config.device_id, 2, [fragile]))
    wait_for(lambda: server.state_of(2) == "active", timeout=30, what="deployment 2 active")

    for _ in range(4):  # a batch of two: the model fails inside onnxruntime
        assert infer(agent, {"inputs": {"x": [[1.0] * 4, [2.0] * 4]}}) == 500

    wait_for(lambda: server.state_of(2) == "rolled_back", timeout=30, what="the rolled_back report")
    assert agent.runner.info is not None and agent.runner.info.deployment_id == 1
    assert infer(agent, {"inputs": {"x": [[1.0] * 4]}}) == 200  # the previous model serves again


def infer(agent: Agent, payload: object) -> int:
    assert agent.server is not None
    connection = http.client.HTTPConnection("127.0.0.1", agent.server.port, timeout=10)
    try:
        connection.request("POST", "/v1/infer", body=json.dumps(payload).encode())
        return connection.getresponse().status
    finally:
        connection.close()
