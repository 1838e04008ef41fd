"""Chunk maths and file manifests, shared by the plane (which builds them) and the agent.

A file is cut into chunks, either of a fixed size (the last one may be short) or
where its content says (the plane's content-defined chunking, fleet/lib/chunking.py),
in which case the manifest lists every chunk's length. The manifest carries the
sha256 of the whole file and of every chunk, so the agent can verify each chunk as
it lands, fetch again only the ones that fail, and take from files it already has
any chunk whose hash it knows (agent/chunkcache.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO, Final

from agent.contract.wire import FileManifest, FileRole

DEFAULT_CHUNK_SIZE: Final = 256 * 1024
_READ_SIZE: Final = 1024 * 1024


def chunk_count(size: int, chunk_size: int) -> int:
    if size < 0 or chunk_size <= 0:
        raise ValueError(f"size {size} and chunk size {chunk_size} must be >= 0 and > 0")
    return -(-size // chunk_size)


def chunk_span(index: int, size: int, chunk_size: int) -> tuple[int, int]:
    """Offset and length of chunk ``index`` of a file of ``size`` bytes."""
    if not 0 <= index < chunk_count(size, chunk_size):
        raise IndexError(f"chunk {index} is outside a {size}-byte file of {chunk_size}-byte chunks")
    offset = index * chunk_size
    return offset, min(chunk_size, size - offset)


def iter_chunks(stream: BinaryIO, chunk_size: int) -> Iterator[bytes]:
    while block := stream.read(chunk_size):
        yield block


def _iter_cut(stream: BinaryIO, lengths: Sequence[int]) -> Iterator[bytes]:
    for length in lengths:
        block = stream.read(length)
        if len(block) != length:
            raise ValueError(f"the file ends inside a {length}-byte chunk")
        yield block
    if stream.read(1):
        raise ValueError(f"the file goes on after its {len(lengths)} chunks")


def build_manifest(
    path: Path,
    *,
    role: FileRole,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    lengths: Sequence[int] = (),
    filename: str | None = None,
    format: str = "onnx",
    precision: str = "",
) -> FileManifest:
    """Hash ``path`` whole and chunk by chunk, reading it once.

    With ``lengths`` (content-defined chunks, in order, adding up to the file's size) the
    chunks are cut there; ``chunk_size`` is then the average they were cut for.
    """
    whole = hashlib.sha256()
    chunks = []
    size = 0
    with path.open("rb") as stream:
        blocks = _iter_cut(stream, lengths) if lengths else iter_chunks(stream, chunk_size)
        for block in blocks:
            whole.update(block)
            chunks.append(hashlib.sha256(block).hexdigest())
            size += len(block)
    return FileManifest(
        role=role,
        filename=filename or path.name,
        sha256=whole.hexdigest(),
        size=size,
        chunk_size=chunk_size,
        chunks=chunks,
        format=format,
        precision=precision,
        lengths=list(lengths),
    )


def check_manifest(manifest: FileManifest) -> None:
    """Raise ValueError if the manifest's chunk list cannot describe its size."""
    if manifest.lengths:
        if len(manifest.lengths) != len(manifest.chunks):
            raise ValueError(
                f"manifest of {manifest.filename} lists {len(manifest.chunks)} chunks "
                f"but {len(manifest.lengths)} chunk lengths"
            )
        if sum(manifest.lengths) != manifest.size:
            raise ValueError(
                f"manifest of {manifest.filename}: its chunk lengths add up to {sum(manifest.lengths)} bytes, "
                f"not the file's {manifest.size}"
            )
        return
    expected = chunk_count(manifest.size, manifest.chunk_size)
    if len(manifest.chunks) != expected:
        raise ValueError(
            f"manifest of {manifest.filename} lists {len(manifest.chunks)} chunks; "
            f"{manifest.size} bytes in {manifest.chunk_size}-byte chunks make {expected}"
        )


def spans(manifest: FileManifest) -> list[tuple[int, int]]:
    """Offset and length of every chunk of a checked manifest, in order."""
    return layout(manifest.size, manifest.chunk_size, manifest.lengths)


def layout(size: int, chunk_size: int, lengths: Sequence[int] = ()) -> list[tuple[int, int]]:
    """Offset and length of every chunk: cut at ``lengths`` if given, else every ``chunk_size`` bytes."""
    if not lengths:
        return [chunk_span(index, size, chunk_size) for index in range(chunk_count(size, chunk_size))]
    offsets = accumulate(lengths, initial=0)
    return list(zip(offsets, lengths, strict=False))


def chunk_length(manifest: FileManifest, index: int) -> int:
    if manifest.lengths:
        return manifest.lengths[index]
    return chunk_span(index, manifest.size, manifest.chunk_size)[1]


def chunk_ok(manifest: FileManifest, index: int, data: bytes) -> bool:
    return len(data) == chunk_length(manifest, index) and hashlib.sha256(data).hexdigest() == manifest.chunks[index]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while block := stream.read(_READ_SIZE):
            digest.update(block)
    return digest.hexdigest()


# The signed form of a file manifest: what the plane signs and the agent verifies. The
# chunk hashes pin every byte the agent fetches; model and version pin the file to the
# release it was published in, so a signed file cannot be replayed under another label.
SIGNED_MANIFEST_DOMAIN: Final = b"edgefleet-manifest-v1\n"


def canonical_manifest(file: FileManifest, *, model: str, version: str) -> bytes:
    """The bytes a manifest's signature covers: a domain tag, then compact JSON with sorted keys."""
    fields = {
        "model": model,
        "version": version,
        "role": file.role,
        "filename": file.filename,
        "format": file.format,
        "precision": file.precision,
        "sha256": file.sha256,
        "size": file.size,
        "chunk_size": file.chunk_size,
        "chunks": file.chunks,
    }
    if file.lengths:  # absent from fixed-size manifests, so their signatures stay as they were
        fields["lengths"] = file.lengths
    return SIGNED_MANIFEST_DOMAIN + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
