"""Pulling one artifact file from the plane over MQTT, chunk by chunk.

The agent asks for chunks by index (at most ``window`` in flight), checks each
against the manifest's chunk hash as it lands, and writes it at its offset in
``downloads/<sha256>.part``. Right after the bytes, the chunk's index is appended
to ``downloads/<sha256>.journal`` (4 bytes, one write). A kill -9 loses nothing the
kernel was handed, so the journal names every chunk written before the kill; both
files are fsynced together every SYNC_EVERY_S, so a power cut costs at most that
much progress. At most the window in flight is fetched again after a kill.

Resume: a restarted agent trusts the journal only as a list of claims. It
re-hashes each claimed chunk from the part file (one read of the bytes already
fetched) and fetches again any that fail, so a crash between writing a chunk and
the page cache reaching the disk cannot smuggle bad bytes into an artifact. It then
rewrites the journal with just the chunks that verified, and appends from there.
(``downloads/<sha256>.state``, the JSON list older agents saved, is read as claims too.)

Delta: before asking for anything, the transfer copies every chunk it can find in
the files the agent already holds (agent/chunkcache.py), checking each hash, and
asks the plane only for the rest. ``fetched_bytes`` and ``reused_bytes`` say how
the file was made up.
"""

from __future__ import annotations

import heapq
import logging
import os
import queue
import struct
import threading
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

import msgspec

from agent import chunkcache
from agent.clock import Clock
from agent.config import TransferConfig
from agent.contract import manifest, wire
from agent.files import fsync_dir, write_atomic

log = logging.getLogger(__name__)

POLL_S: Final = 0.1
# A journal entry is written after every chunk (cheap: no fsync); the part file and the journal
# are flushed to disk this often, which bounds what a power cut (not a kill) can lose.
SYNC_EVERY_S: Final = 1.0
_ENTRY: Final = struct.Struct(">I")
FIRST_BACKOFF_S: Final = 0.1

RequestChunks = Callable[[list[int]], None]
Progress = Callable[[int, int], None]


class TransferFailed(Exception):
    """The file could not be fetched. The text says why, for the deployment's error."""


class TransferCancelled(Exception):
    """A newer deployment replaced the one this transfer was for."""


class ResumeState(msgspec.Struct, kw_only=True):
    """The JSON list of verified chunks that agents before the journal saved; read as claims on resume."""

    sha256: str
    size: int
    chunk_size: int
    verified: list[int]


def artifact_path(data_dir: Path, sha256: str) -> Path:
    return data_dir / "artifacts" / sha256


def find_artifact(data_dir: Path, sha256: str) -> Path | None:
    """The stored artifact with this hash, if it is there and intact."""
    path = artifact_path(data_dir, sha256)
    if path.is_file() and manifest.file_sha256(path) == sha256:
        return path
    return None


def prune(data_dir: Path, keep: set[str]) -> int:
    """Delete stored artifacts (with their manifests) and partial downloads not in ``keep``; the bytes freed.

    The agent keeps what its two slots run and what a deployment in progress needs;
    everything else is a version it can no longer go back to.
    """
    freed = 0
    for folder in (data_dir / "artifacts", data_dir / "downloads"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            sha256 = entry.name.split(".", 1)[0]
            if sha256 in keep or not entry.is_file():
                continue
            try:
                size = entry.stat().st_size
                entry.unlink()
            except OSError as exc:
                log.warning("transfer.prune_failed path=%s error=%s", entry, exc)
                continue
            freed += size
            log.info("transfer.pruned path=%s bytes=%d", entry, size)
    return freed


class Transfer:
    """Fetches one file. ``run`` blocks in a worker thread; ``feed`` takes frames from any thread."""

    def __init__(
        self,
        file: wire.FileManifest,
        *,
        data_dir: Path,
        request: RequestChunks,
        settings: TransferConfig,
        clock: Clock,
        on_progress: Progress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        self.file = file
        self.data_dir = data_dir
        self.settings = settings
        self.clock = clock
        self.bad_chunks = 0
        self.fetched_bytes = 0
        self.reused_bytes = 0
        self._spans = manifest.spans(file) if _valid(file) else []
        self._request = request
        self._on_progress = on_progress or (lambda done, total: None)
        self._cancel = cancel or threading.Event()
        self._inbox: queue.Queue[wire.Chunk] = queue.Queue(maxsize=max(64, settings.window * 4))
        self._nudged = threading.Event()
        self._verified: set[int] = set()
        self._inflight: set[int] = set()
        self._waiting: deque[int] = deque()
        self._retries: list[tuple[float, int]] = []
        self._attempts: Counter[int] = Counter()
        self._problems: dict[int, str] = {}
        self._last_progress = 0.0
        self._done_bytes = 0
        self._journal_fd = -1
        self._synced_at = 0.0

    @property
    def sha256(self) -> str:
        return self.file.sha256

    def feed(self, chunk: wire.Chunk) -> None:
        # A full inbox means this transfer is behind; the stall timer fetches the chunk again.
        try:
            self._inbox.put_nowait(chunk)
        except queue.Full:
            log.warning("transfer.inbox_full sha256=%s index=%d", self.sha256[:12], chunk.index)

    def nudge(self) -> None:
        """Ask again for every chunk in flight now, e.g. because replies were lost in a reconnect."""
        self._nudged.set()

    def run(self) -> Path:
        """Fetch, verify and store the file; return its path under ``artifacts/``."""
        _check_manifest(self.file)
        existing = find_artifact(self.data_dir, self.sha256)
        if existing:
            log.info("transfer.already_stored sha256=%s", self.sha256[:12])
            if not chunkcache.manifest_path(existing).is_file():
                chunkcache.remember(existing, self.file)
            return existing
        self._part.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._part, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._prepare(fd)
            self._fetch(fd)
            os.fsync(fd)
        finally:
            self._close_journal(fd)
            os.close(fd)
        return self._store()

    # --- resume -------------------------------------------------------------

    @property
    def _part(self) -> Path:
        return self.data_dir / "downloads" / f"{self.sha256}.part"

    @property
    def _state(self) -> Path:
        return self.data_dir / "downloads" / f"{self.sha256}.state"

    @property
    def _journal(self) -> Path:
        return self.data_dir / "downloads" / f"{self.sha256}.journal"

    def _prepare(self, fd: int) -> None:
        os.ftruncate(fd, self.file.size)
        self._verified = self._reverify(fd, self._claimed())
        self._open_journal()
        self._reuse(fd)
        self._waiting = deque(i for i in range(len(self.file.chunks)) if i not in self._verified)
        self._done_bytes = sum(self._length(i) for i in self._verified)
        self._last_progress = self.clock.monotonic()
        if self._verified:
            log.info(
                "transfer.resumed sha256=%s verified=%d of=%d",
                self.sha256[:12],
                len(self._verified),
                len(self.file.chunks),
            )
        self._on_progress(self._done_bytes, self.file.size)

    def _claimed(self) -> set[int]:
        """Chunks the journal (and an older agent's state file) say were written; each is re-hashed."""
        claimed: set[int] = set()
        try:
            raw = self._journal.read_bytes()
        except OSError:
            raw = b""
        whole = len(raw) - len(raw) % _ENTRY.size  # a torn last entry is no claim
        claimed.update(index for (index,) in _ENTRY.iter_unpack(raw[:whole]))
        try:
            state = msgspec.json.decode(self._state.read_bytes(), type=ResumeState)
        except (OSError, msgspec.DecodeError):
            state = None
        if state is not None and (state.sha256, state.size) == (self.sha256, self.file.size):
            claimed.update(state.verified)
        return {i for i in claimed if 0 <= i < len(self.file.chunks)}

    def _open_journal(self) -> None:
        """Rewrite the journal with just the chunks that re-verified, then append to it."""
        entries = b"".join(_ENTRY.pack(i) for i in sorted(self._verified))
        write_atomic(self._journal, entries)
        self._state.unlink(missing_ok=True)
        self._journal_fd = os.open(self._journal, os.O_WRONLY | os.O_APPEND)
        self._synced_at = self.clock.monotonic()

    def _journal_chunk(self, fd: int, index: int) -> None:
        # The bytes went to the part file first: a claim never precedes its chunk in the kernel's
        # view, and a power cut that reorders them is caught by the re-hash on resume.
        os.write(self._journal_fd, _ENTRY.pack(index))
        now = self.clock.monotonic()
        if now - self._synced_at >= SYNC_EVERY_S:
            self._synced_at = now
            self._sync(fd)

    def _sync(self, fd: int) -> None:
        os.fdatasync(fd)
        os.fdatasync(self._journal_fd)

    def _close_journal(self, fd: int) -> None:
        if self._journal_fd < 0:
            return
        try:
            self._sync(fd)  # whatever happens next, a later run starts from here
        except OSError as exc:
            log.warning("transfer.sync_failed sha256=%s error=%s", self.sha256[:12], exc)
        os.close(self._journal_fd)
        self._journal_fd = -1

    def _reverify(self, fd: int, claimed: set[int]) -> set[int]:
        good = set()
        for index in claimed:
            offset, length = self._spans[index]
            if manifest.chunk_ok(self.file, index, os.pread(fd, length, offset)):
                good.add(index)
        return good

    def _reuse(self, fd: int) -> None:
        """Copy in every missing chunk that a file the agent holds already contains."""
        missing = [i for i in range(len(self.file.chunks)) if i not in self._verified]
        sources = chunkcache.find(
            self.data_dir / "artifacts", {self.file.chunks[i] for i in missing}, exclude=self.sha256
        )
        if not sources:
            return
        opened: dict[Path, int] = {}
        try:
            for index in missing:
                source = sources.get(self.file.chunks[index])
                if source is None:
                    continue
                data = chunkcache.read(source, opened)
                if not manifest.chunk_ok(self.file, index, data):
                    continue  # the held file changed under us: fetch this chunk instead
                os.pwrite(fd, data, self._spans[index][0])
                self._verified.add(index)
                self._journal_chunk(fd, index)
                self.reused_bytes += len(data)
        finally:
            for held in opened.values():
                os.close(held)
        log.info(
            "transfer.reused sha256=%s chunks=%d bytes=%d of=%d",
            self.sha256[:12],
            sum(1 for i in missing if i in self._verified),
            self.reused_bytes,
            self.file.size,
        )

    # --- fetch loop ---------------------------------------------------------

    def _fetch(self, fd: int) -> None:
        while len(self._verified) < len(self.file.chunks):
            if self._cancel.is_set():
                raise TransferCancelled(f"transfer of {self.file.filename} was cancelled")
            now = self.clock.monotonic()
            self._requeue_retries(now)
            self._check_stall(now)
            self._request_more()
            try:
                chunk = self._inbox.get(timeout=POLL_S)
            except queue.Empty:
                continue
            self._accept(fd, chunk)

    def _requeue_retries(self, now: float) -> None:
        while self._retries and self._retries[0][0] <= now:
            _, index = heapq.heappop(self._retries)
            self._waiting.appendleft(index)

    def _check_stall(self, now: float) -> None:
        stalled = now - self._last_progress >= self.settings.stall_timeout
        if not self._inflight or not (stalled or self._nudged.is_set()):
            return
        self._nudged.clear()
        log.warning("transfer.stalled sha256=%s missing=%d", self.sha256[:12], len(self._inflight))
        for index in sorted(self._inflight):
            self._retry_later(index, now, f"no reply within {self.settings.stall_timeout:g}s")
        self._inflight.clear()
        self._last_progress = now

    def _retry_later(self, index: int, now: float, problem: str) -> None:
        self._problems[index] = problem
        delay = min(FIRST_BACKOFF_S * 2 ** (self._attempts[index] - 1), self.settings.stall_timeout)
        heapq.heappush(self._retries, (now + delay, index))

    def _request_more(self) -> None:
        batch = []
        while self._waiting and len(self._inflight) < self.settings.window:
            index = self._waiting.popleft()
            if index in self._verified or index in self._inflight:
                continue
            self._count_attempt(index)
            self._inflight.add(index)
            batch.append(index)
        for start in range(0, len(batch), wire.MAX_CHUNKS_PER_REQUEST):
            self._request(batch[start : start + wire.MAX_CHUNKS_PER_REQUEST])

    def _count_attempt(self, index: int) -> None:
        if self._attempts[index] >= self.settings.max_attempts:
            problem = self._problems.get(index, "no reply")
            raise TransferFailed(
                f"chunk {index} of {self.file.filename} failed {self._attempts[index]} attempts; last: {problem}"
            )
        self._attempts[index] += 1

    def _accept(self, fd: int, chunk: wire.Chunk) -> None:
        if chunk.sha256 != self.sha256:
            return
        if chunk.kind is wire.ChunkKind.ERROR:
            reason = chunk.data.decode("utf-8", errors="replace")
            raise TransferFailed(f"the plane cannot serve {self.file.filename}: {reason}")
        if not 0 <= chunk.index < len(self.file.chunks) or chunk.index in self._verified:
            return
        self._inflight.discard(chunk.index)
        if not manifest.chunk_ok(self.file, chunk.index, chunk.data):
            self._reject(chunk.index)
            return
        os.pwrite(fd, chunk.data, self._spans[chunk.index][0])
        self._verified.add(chunk.index)
        self._journal_chunk(fd, chunk.index)
        self._done_bytes += len(chunk.data)
        self.fetched_bytes += len(chunk.data)
        self._last_progress = self.clock.monotonic()
        self._on_progress(self._done_bytes, self.file.size)

    def _reject(self, index: int) -> None:
        self.bad_chunks += 1
        log.warning("transfer.bad_chunk sha256=%s index=%d bad_chunks=%d", self.sha256[:12], index, self.bad_chunks)
        self._retry_later(index, self.clock.monotonic(), "chunk hash mismatch")

    def _length(self, index: int) -> int:
        return self._spans[index][1]

    # --- store --------------------------------------------------------------

    def _store(self) -> Path:
        actual = manifest.file_sha256(self._part)
        if actual != self.sha256:
            self._part.unlink(missing_ok=True)
            self._journal.unlink(missing_ok=True)
            raise TransferFailed(
                f"{self.file.filename} hashes to {actual}, not {self.sha256}; fetched chunks are dropped"
            )
        target = artifact_path(self.data_dir, self.sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self._part, target)
        chunkcache.remember(target, self.file)
        fsync_dir(target.parent)
        self._journal.unlink(missing_ok=True)
        log.info(
            "transfer.stored sha256=%s bytes=%d fetched=%d reused=%d bad_chunks=%d",
            self.sha256[:12],
            self.file.size,
            self.fetched_bytes,
            self.reused_bytes,
            self.bad_chunks,
        )
        return target


def _valid(file: wire.FileManifest) -> bool:
    try:
        manifest.check_manifest(file)
    except ValueError:
        return False
    return True


def _check_manifest(file: wire.FileManifest) -> None:
    try:
        manifest.check_manifest(file)
    except ValueError as exc:
        raise TransferFailed(str(exc)) from None
