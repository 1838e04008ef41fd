"""The chunks of the files the agent already holds, found by their hash.

Every stored artifact keeps its manifest beside it (``artifacts/<sha256>.manifest``).
Before a transfer asks the plane for anything, it looks up the chunks it needs in
those manifests and copies each one it finds from the local file, checking its hash
as it goes. A version that differs from the held one in a layer or in its metadata
then costs only the chunks around the change (the plane cuts files at
content-defined boundaries, fleet/lib/chunking.py).

The cache is the artifacts themselves, not a second copy of their bytes: a chunk is
available for as long as a file that contains it is kept (the active and previous
slots, see agent/core.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final, NamedTuple

import msgspec

from agent.contract import manifest, wire
from agent.files import write_atomic

log = logging.getLogger(__name__)

SUFFIX: Final = ".manifest"


class Source(NamedTuple):
    """Where a chunk's bytes are in a file the agent holds."""

    path: Path
    offset: int
    length: int


def manifest_path(artifact: Path) -> Path:
    return artifact.with_name(artifact.name + SUFFIX)


def remember(artifact: Path, file: wire.FileManifest) -> None:
    """Keep ``file``'s manifest beside the stored artifact, so later transfers can reuse its chunks."""
    write_atomic(manifest_path(artifact), msgspec.json.encode(file), sync=False)


def forget(artifact: Path) -> None:
    manifest_path(artifact).unlink(missing_ok=True)


def find(artifacts_dir: Path, wanted: set[str], *, exclude: str = "") -> dict[str, Source]:
    """For each chunk hash in ``wanted`` that a held file contains, where to read it.

    Manifests that cannot be read, or whose artifact is gone, are skipped: the chunks
    they describe are fetched instead.
    """
    found: dict[str, Source] = {}
    if not wanted or not artifacts_dir.is_dir():
        return found
    for entry in sorted(artifacts_dir.glob("*" + SUFFIX)):
        artifact = entry.with_name(entry.name.removesuffix(SUFFIX))
        if artifact.name == exclude or not artifact.is_file():
            continue
        try:
            held = msgspec.json.decode(entry.read_bytes(), type=wire.FileManifest)
            manifest.check_manifest(held)
        except (OSError, msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            log.warning("chunkcache.unreadable path=%s error=%s", entry, exc)
            continue
        if held.sha256 != artifact.name or held.size != artifact.stat().st_size:
            continue
        for (offset, length), digest in zip(manifest.spans(held), held.chunks, strict=True):
            if digest in wanted and digest not in found:
                found[digest] = Source(artifact, offset, length)
        if len(found) == len(wanted):
            break
    return found


def read(source: Source, opened: dict[Path, int]) -> bytes:
    """The source's bytes; ``opened`` keeps one descriptor a file, for the caller to close."""
    fd = opened.get(source.path)
    if fd is None:
        fd = opened[source.path] = os.open(source.path, os.O_RDONLY)
    return os.pread(fd, source.length, source.offset)
