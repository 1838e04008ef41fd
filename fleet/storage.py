"""Where artifact files live: content-addressed by sha256, behind a small interface.

Callers hold storage keys, never paths, so an S3-compatible store can replace the
filesystem one without touching them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from django.conf import settings

from fleet import errors


class Incoming(NamedTuple):
    """A file saved under ``incoming/``, hashed while it was written."""

    key: str
    size: int
    sha256: str


class ArtifactStore(Protocol):
    def save_incoming(self, stream: BinaryIO, *, max_bytes: int) -> Incoming: ...
    def path(self, key: str) -> Path: ...
    def promote(self, incoming_key: str, sha256: str) -> str: ...
    def delete(self, key: str) -> None: ...
    def exists(self, key: str) -> bool: ...
    def copy_in(self, path: Path) -> str: ...


class TooLarge(errors.TooLarge):
    """An upload past ARTIFACT_MAX_BYTES."""


class FilesystemStore:
    """Files under one root: ``incoming/<uuid>`` while processed, then ``sha256/ab/<sha256>``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, key: str) -> Path:
        resolved = (self.root / key).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise ValueError(f"storage key {key!r} leaves the artifact root")
        return resolved

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def save_incoming(self, stream: BinaryIO, *, max_bytes: int) -> Incoming:
        key = f"incoming/{uuid.uuid4().hex}"
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        # Hashed on the way in, so a duplicate is refused before any row exists.
        digest = hashlib.sha256()
        try:
            with target.open("wb") as out:
                while block := stream.read(1024 * 1024):
                    size += len(block)
                    if size > max_bytes:
                        raise TooLarge(f"the file is over the {max_bytes}-byte limit (ARTIFACT_MAX_BYTES)")
                    digest.update(block)
                    out.write(block)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        return Incoming(key, size, digest.hexdigest())

    def promote(self, incoming_key: str, sha256: str) -> str:
        """Move a processed file to its content address; an identical file already there wins."""
        key = f"sha256/{sha256[:2]}/{sha256}"
        target = self.path(key)
        source = self.path(incoming_key)
        if target.exists():
            source.unlink(missing_ok=True)
            return key
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return key

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def copy_in(self, path: Path) -> str:
        key = f"incoming/{uuid.uuid4().hex}"
        self.path(key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, self.path(key))
        return key


def get_store() -> ArtifactStore:
    """The configured artifact store. Callers hold it as an ArtifactStore, so another (S3) can replace it."""
    return FilesystemStore(Path(settings.ARTIFACT_ROOT))
