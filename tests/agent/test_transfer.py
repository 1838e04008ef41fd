from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.clock import SystemClock
from agent.config import TransferConfig
from agent.contract import manifest, wire
from agent.transfer import Transfer, TransferCancelled, TransferFailed, artifact_path

CHUNK = 1024
FAST = TransferConfig(window=4, stall_timeout=0.3, max_attempts=3)


class Plane:
    """Answers a transfer's requests by feeding frames straight back, like the bridge would."""

    def __init__(self, data: bytes, file: wire.FileManifest) -> None:
        self.data = data
        self.file = file
        self.transfer: Transfer | None = None
        self.requests: list[list[int]] = []
        self.corrupt: set[int] = set()
        self.silent: set[int] = set()
        self.error: str | None = None
        self.in_flight_peak = 0

    def request(self, indexes: list[int]) -> None:
        self.requests.append(indexes)
        assert self.transfer is not None
        for index in indexes:
            if index not in self.silent:
                self.transfer.feed(wire.decode_chunk(self.frame(index)))

    def frame(self, index: int) -> bytes:
        if self.error is not None:
            return wire.encode_chunk(self.file.sha256, index, self.error.encode(), wire.ChunkKind.ERROR)
        offset, length = manifest.spans(self.file)[index]
        chunk = self.data[offset : offset + length]
        if index in self.corrupt:
            self.corrupt.discard(index)
            chunk = b"\0" * len(chunk)
        return wire.encode_chunk(self.file.sha256, index, chunk)

    @property
    def requested(self) -> list[int]:
        return [index for batch in self.requests for index in batch]


def make_file(tmp_path: Path, size: int = 10 * CHUNK + 100) -> tuple[bytes, wire.FileManifest]:
    data = os.urandom(size)
    source = tmp_path / "source.onnx"
    source.write_bytes(data)
    return data, manifest.build_manifest(source, role="model", chunk_size=CHUNK)


def make_transfer(tmp_path: Path, plane: Plane, settings: TransferConfig = FAST, **kwargs: object) -> Transfer:
    transfer = Transfer(
        plane.file,
        data_dir=tmp_path / "data",
        request=plane.request,
        settings=settings,
        clock=SystemClock(),
        **kwargs,  # type: ignore[arg-type]  # on_progress / cancel pass-through
    )
    plane.transfer = transfer
    return transfer


def test_it_fetches_a_file_and_stores_it_by_sha(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    progress: list[tuple[int, int]] = []
    path = make_transfer(tmp_path, Plane(data, file), on_progress=lambda d, t: progress.append((d, t))).run()
    assert path == artifact_path(tmp_path / "data", file.sha256)
    assert path.read_bytes() == data
    assert progress[-1] == (file.size, file.size)
    assert list((tmp_path / "data" / "downloads").iterdir()) == []


def test_it_asks_for_every_chunk_once_and_never_more_than_the_window(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    plane = Plane(data, file)
    make_transfer(tmp_path, plane).run()
    assert sorted(plane.requested) == list(range(len(file.chunks)))
    assert max(len(batch) for batch in plane.requests) <= FAST.window


def test_it_fetches_a_corrupted_chunk_again(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    plane = Plane(data, file)
    plane.corrupt = {3}
    transfer = make_transfer(tmp_path, plane)
    assert transfer.run().read_bytes() == data
    assert transfer.bad_chunks == 1
    assert plane.requested.count(3) == 2


def test_it_fails_with_the_planes_reason(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    plane = Plane(data, file)
    plane.error = "artifact deleted by operator"
    with pytest.raises(TransferFailed, match="artifact deleted by operator"):
        make_transfer(tmp_path, plane).run()


def test_it_asks_again_after_a_stall(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    plane = Plane(data, file)
    plane.silent = {5}
    original = plane.request

    def answer_the_second_time(indexes: list[int]) -> None:
        if 5 in indexes and plane.requested.count(5) >= 1:
            plane.silent.discard(5)
        original(indexes)

    plane.request = answer_the_second_time  # type: ignore[method-assign]
    assert make_transfer(tmp_path, plane).run().read_bytes() == data
    assert plane.requested.count(5) == 2


def test_it_gives_up_after_max_attempts(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    plane = Plane(data, file)
    plane.silent = {2}
    with pytest.raises(TransferFailed, match="chunk 2 of source.onnx failed 3 attempts; last: no reply within 0.3s"):
        make_transfer(tmp_path, plane).run()
    assert plane.requested.count(2) == 3


def test_it_resumes_without_fetching_verified_chunks_again(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    first = Plane(data, file)
    first.silent = set(range(6, len(file.chunks)))
    cancel = threading.Event()
    transfer = make_transfer(tmp_path, first, cancel=cancel)
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(TransferCancelled):
        transfer.run()

    second = Plane(data, file)
    assert make_transfer(tmp_path, second).run().read_bytes() == data
    assert sorted(second.requested) == list(range(6, len(file.chunks)))


def test_it_fetches_again_a_resumed_chunk_the_disk_damaged(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    first = Plane(data, file)
    first.silent = set(range(6, len(file.chunks)))
    cancel = threading.Event()
    threading.Timer(0.2, cancel.set).start()
    with pytest.raises(TransferCancelled):
        make_transfer(tmp_path, first, cancel=cancel).run()
    part = tmp_path / "data" / "downloads" / f"{file.sha256}.part"
    with part.open("r+b") as stream:
        stream.seek(CHUNK)  # chunk 1
        stream.write(b"rot")

    second = Plane(data, file)
    assert make_transfer(tmp_path, second).run().read_bytes() == data
    assert sorted(second.requested) == [1, *range(6, len(file.chunks))]


def test_it_skips_a_file_already_stored(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    stored = artifact_path(tmp_path / "data", file.sha256)
    stored.parent.mkdir(parents=True)
    stored.write_bytes(data)
    plane = Plane(data, file)
    assert make_transfer(tmp_path, plane).run() == stored
    assert plane.requests == []


def test_it_stores_an_empty_file(tmp_path: Path) -> None:
    data, file = make_file(tmp_path, size=0)
    assert make_transfer(tmp_path, Plane(data, file)).run().read_bytes() == b""


def test_it_refuses_a_manifest_that_does_not_add_up(tmp_path: Path) -> None:
    data, file = make_file(tmp_path)
    broken = wire.FileManifest(**{**{f: getattr(file, f) for f in file.__struct_fields__}, "chunks": file.chunks[:2]})
    with pytest.raises(TransferFailed, match="lists 2 chunks"):
        make_transfer(tmp_path, Plane(data, broken)).run()
