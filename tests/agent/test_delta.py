"""Delta transfer: a new file's chunks that the agent already holds are copied, not fetched."""

from __future__ import annotations

import os
import random
from pathlib import Path

import msgspec

from agent import chunkcache
from agent.contract import manifest, wire
from tests.agent.test_transfer import Plane, make_transfer

CHUNK = 1024


def cut_at_content(data: bytes) -> list[int]:
    """Cut after every "|" (a stand-in for the plane's content-defined chunking)."""
    lengths, start = [], 0
    for index, byte in enumerate(data):
        if byte == ord("|") or index == len(data) - 1:
            lengths.append(index + 1 - start)
            start = index + 1
    return lengths


def make(tmp_path: Path, name: str, blocks: list[bytes]) -> tuple[bytes, wire.FileManifest]:
    data = b"|".join(blocks) + b"|"
    path = tmp_path / name
    path.write_bytes(data)
    return data, manifest.build_manifest(path, role="model", chunk_size=CHUNK, lengths=cut_at_content(data))


def blocks(count: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [bytes(rng.choice(b"abcdefgh") for _ in range(rng.randint(500, 1500))) for _ in range(count)]


def held(tmp_path: Path, data: bytes, file: wire.FileManifest) -> Path:
    """The agent's data directory once it has fetched ``file``."""
    make_transfer(tmp_path, Plane(data, file)).run()
    return tmp_path / "data"


def test_it_fetches_only_the_chunks_it_does_not_hold(tmp_path: Path) -> None:
    old_blocks = blocks(20)
    old_data, old_file = make(tmp_path, "v1.onnx", old_blocks)
    held(tmp_path, old_data, old_file)
    new_blocks = [b"a new header", *old_blocks[:7], b"one changed tensor", *old_blocks[8:]]
    new_data, new_file = make(tmp_path, "v2.onnx", new_blocks)

    plane = Plane(new_data, new_file)
    transfer = make_transfer(tmp_path, plane)
    path = transfer.run()

    assert path.read_bytes() == new_data
    have = set(old_file.chunks)
    missing = [i for i, digest in enumerate(new_file.chunks) if digest not in have]
    assert sorted(plane.requested) == missing == [0, 8]
    assert transfer.fetched_bytes == sum(new_file.lengths[i] for i in missing)
    assert transfer.reused_bytes == new_file.size - transfer.fetched_bytes


def test_it_keeps_each_stored_files_manifest_for_later_transfers(tmp_path: Path) -> None:
    data, file = make(tmp_path, "v1.onnx", blocks(3))
    data_dir = held(tmp_path, data, file)

    stored = chunkcache.manifest_path(data_dir / "artifacts" / file.sha256)
    assert msgspec.json.decode(stored.read_bytes(), type=wire.FileManifest) == file


def test_it_fetches_a_chunk_whose_held_copy_has_changed_on_disk(tmp_path: Path) -> None:
    old_blocks = blocks(6)
    old_data, old_file = make(tmp_path, "v1.onnx", old_blocks)
    data_dir = held(tmp_path, old_data, old_file)
    artifact = data_dir / "artifacts" / old_file.sha256
    with artifact.open("r+b") as f:  # bit rot in the held file's second chunk
        f.seek(old_file.lengths[0] + 3)
        f.write(b"Z")
    new_data, new_file = make(tmp_path, "v2.onnx", [*old_blocks, b"appended"])

    plane = Plane(new_data, new_file)
    path = make_transfer(tmp_path, plane).run()

    assert path.read_bytes() == new_data
    assert sorted(plane.requested) == [1, len(new_file.chunks) - 1]


def test_it_ignores_a_held_manifest_it_cannot_read(tmp_path: Path) -> None:
    old_blocks = blocks(4)
    old_data, old_file = make(tmp_path, "v1.onnx", old_blocks)
    data_dir = held(tmp_path, old_data, old_file)
    chunkcache.manifest_path(data_dir / "artifacts" / old_file.sha256).write_bytes(b"{not json")
    new_data, new_file = make(tmp_path, "v2.onnx", [*old_blocks, b"more"])

    plane = Plane(new_data, new_file)
    assert make_transfer(tmp_path, plane).run().read_bytes() == new_data
    assert sorted(plane.requested) == list(range(len(new_file.chunks)))


def test_fixed_size_files_share_the_chunks_that_did_not_move(tmp_path: Path) -> None:
    old_data = os.urandom(10 * CHUNK)
    (tmp_path / "v1.onnx").write_bytes(old_data)
    old_file = manifest.build_manifest(tmp_path / "v1.onnx", role="model", chunk_size=CHUNK)
    held(tmp_path, old_data, old_file)
    new_data = old_data[: 4 * CHUNK] + os.urandom(CHUNK) + old_data[5 * CHUNK :]
    (tmp_path / "v2.onnx").write_bytes(new_data)
    new_file = manifest.build_manifest(tmp_path / "v2.onnx", role="model", chunk_size=CHUNK)

    plane = Plane(new_data, new_file)
    make_transfer(tmp_path, plane).run()

    assert plane.requested == [4]
