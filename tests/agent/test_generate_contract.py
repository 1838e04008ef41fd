"""The wire contract's additions for generative models: still decodes what older planes and agents send."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from agent.bundles import assemble, bundle_key, prune_bundles
from agent.config import GenerationConfig
from agent.contract import wire
from agent.contract.manifest import file_sha256
from agent.transfer import artifact_path

BEAT = {
    "v": 1,
    "device_id": "dev-1",
    "seq": 1,
    "sent_at": 1.0,
    "interval_s": 30.0,
    "uptime_s": 1.0,
    "cpu_percent": 1.0,
    "mem_rss_bytes": 1,
    "mem_available_bytes": 1,
}
FILE = {"role": "model", "filename": "model.onnx", "sha256": "a" * 64, "size": 1, "chunk_size": 1024, "chunks": []}


def test_it_decodes_a_heartbeat_without_generation_figures() -> None:
    beat = wire.decode(wire.Channel.HEARTBEAT, msgspec.json.encode(BEAT))
    assert isinstance(beat, wire.Heartbeat) and beat.generation is None


def test_it_carries_generation_figures_in_a_heartbeat() -> None:
    stats = {"requests": 3, "errors": 1, "tokens": 90, "ttft_p50_ms": 40.5, "ttft_p95_ms": 80.0, "decode_tps_p50": 61.2}
    beat = wire.decode(wire.Channel.HEARTBEAT, msgspec.json.encode(BEAT | {"generation": stats}))
    assert isinstance(beat, wire.Heartbeat) and beat.generation == wire.GenerationStats(**stats)


@pytest.mark.parametrize(
    "bad",
    [
        {"requests": 2**31},
        {"requests": 1, "tokens": -1},
        {"requests": 1, "ttft_p95_ms": 1e12},
        {"requests": 1, "decode_tps_p50": 1e9},
        {"requests": 1, "ttft_p50_ms": -0.5},
    ],
)
def test_it_refuses_generation_figures_out_of_range(bad: dict[str, float]) -> None:
    with pytest.raises(wire.WireError, match="generation"):
        wire.decode(wire.Channel.HEARTBEAT, msgspec.json.encode(BEAT | {"generation": bad}))


@pytest.mark.parametrize("name", ["model.onnx.data", "genai_config.json", "my model (1).onnx", "a..b"])
def test_it_accepts_plain_file_names(name: str) -> None:
    assert msgspec.convert(FILE | {"filename": name}, wire.FileManifest).filename == name


@pytest.mark.parametrize("name", ["..", ".", "../model.onnx", "sub/model.onnx", "c:\\model.onnx", "model.onnx\n", ""])
def test_it_refuses_file_names_that_leave_the_bundle_directory(name: str) -> None:
    with pytest.raises(msgspec.ValidationError, match="filename"):
        msgspec.convert(FILE | {"filename": name}, wire.FileManifest)


def test_it_defaults_a_self_test_to_no_prompts_and_ninety_percent() -> None:
    test = msgspec.json.decode(b'{"texts": ["a"], "embeddings": [[1.0]]}', type=wire.SelfTest)
    assert (test.prompts, test.token_ids, test.min_token_agreement) == ([], [], 0.9)
    with pytest.raises(msgspec.ValidationError, match="min_token_agreement"):
        msgspec.json.decode(b'{"min_token_agreement": 1.5}', type=wire.SelfTest)


def test_it_gives_generations_every_core_but_one() -> None:
    assert GenerationConfig(threads=3).thread_count() == 3
    assert GenerationConfig().thread_count() >= 1


def _store(data_dir: Path, payload: bytes, name: str) -> tuple[str, str]:
    (data_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    scratch = data_dir / name
    scratch.write_bytes(payload)
    sha = file_sha256(scratch)
    scratch.rename(artifact_path(data_dir, sha))
    return name, sha


def test_it_links_a_bundle_under_its_file_names(tmp_path: Path) -> None:
    files = dict(_store(tmp_path, data, name) for name, data in [("model.onnx", b"graph"), ("model.onnx.data", b"w")])
    directory = assemble(tmp_path, files)
    assert directory.name == bundle_key(files)
    assert sorted(p.name for p in directory.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert (directory / "model.onnx").read_bytes() == b"graph"
    inode = (directory / "model.onnx").stat().st_ino
    assert assemble(tmp_path, files) == directory  # the same files: the same directory, left as it is
    assert (directory / "model.onnx").stat().st_ino == inode
    (directory / "stray").write_bytes(b"")
    assert sorted(p.name for p in assemble(tmp_path, files).iterdir()) == ["model.onnx", "model.onnx.data"]

    prune_bundles(tmp_path, [])
    assert not directory.exists()
