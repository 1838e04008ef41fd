"""Carrying one desired deployment to active: admit, download, verify, load, self-test, report.

A job runs in its own thread, never on paho's. A newer desired deployment cancels
the running job and starts only once that job has stopped, so two jobs never
race to swap the runner's model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent import admission
from agent.active import ActiveDeployment, active_from
from agent.bundles import MissingArtifacts, load_deployment
from agent.clock import Clock
from agent.config import AdmissionConfig, GenerationConfig, TransferConfig
from agent.contract import manifest, signing, wire
from agent.runtime import Loaded, ModelLoadError
from agent.selftest import SelfTestFailed, run_selftest
from agent.transfer import Transfer, TransferCancelled, TransferFailed

log = logging.getLogger(__name__)

# The plane needs progress, not a report for every chunk.
PROGRESS_EVERY_S: Final = 1.0
MAX_ERROR_CHARS: Final = 2000


class DeploymentError(Exception):
    """The desired deployment cannot be carried out as given. The text says why."""


class Ineligible(Exception):
    """The device cannot take this version (disk, RAM, execution provider). The text says why."""


class Reporter(Protocol):
    def __call__(
        self,
        deployment_id: int,
        state: wire.DeploymentStateName,
        *,
        sha256: str | None = None,
        error: str = "",
        bytes_done: int = 0,
        bytes_total: int = 0,
    ) -> None: ...


RequestChunks = Callable[[int, str, list[int]], None]
# Makes a loaded, self-tested model the current one; the agent owns the slots.
Activate = Callable[[Loaded, ActiveDeployment], None]
# Roles a deployment may list once at most; a generate bundle may hold several tokenizer files.
_SINGLE_ROLES: Final = ("model", "model_data", "config")


class DeploymentJob:
    """One desired deployment, from its first chunk request to an active model or a failure."""

    def __init__(
        self,
        desired: wire.Desired,
        *,
        data_dir: Path,
        settings: TransferConfig,
        clock: Clock,
        report: Reporter,
        request_chunks: RequestChunks,
        activate: Activate,
        rules: AdmissionConfig | None = None,
        measure: admission.Measure = admission.measure,
        after: DeploymentJob | None = None,
        plane_key: Ed25519PublicKey | None = None,
        generation: GenerationConfig | None = None,
    ) -> None:
        assert desired.deployment_id is not None
        self.desired = desired
        self.deployment_id: int = desired.deployment_id
        self.data_dir = data_dir
        self.settings = settings
        self.clock = clock
        self.rules = rules or AdmissionConfig()
        self.generation = generation or GenerationConfig()
        self.bytes_done = 0
        self._measure = measure
        self._plane_key = plane_key
        self._report = report
        self._request_chunks = request_chunks
        self._activate = activate
        self._after = after
        self._cancelled = threading.Event()
        self._transfer: Transfer | None = None
        self._reported_at = float("-inf")
        self._thread = threading.Thread(target=self._run, name=f"deployment-{self.deployment_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._cancelled.is_set()

    def feed(self, chunk: wire.Chunk) -> None:
        transfer = self._transfer
        if transfer is not None and transfer.sha256 == chunk.sha256:
            transfer.feed(chunk)

    def nudge(self) -> None:
        transfer = self._transfer
        if transfer is not None:
            transfer.nudge()

    def _run(self) -> None:
        if self._after is not None:
            self._after.join()
        try:
            self._deploy()
        except TransferCancelled:
            log.info("deployment.cancelled deployment_id=%d", self.deployment_id)
        except Ineligible as exc:
            log.warning("deployment.ineligible deployment_id=%d reason=%r", self.deployment_id, str(exc))
            self._report(self.deployment_id, "ineligible", error=str(exc)[:MAX_ERROR_CHARS])
        except SelfTestFailed as exc:
            self._fail(f"self-test failed, the model was not activated: {exc}")
        except (DeploymentError, TransferFailed, ModelLoadError, MissingArtifacts, signing.SignatureError) as exc:
            self._fail(str(exc))
        except Exception as exc:
            log.exception("deployment.crashed deployment_id=%d", self.deployment_id)
            self._fail(f"agent error: {type(exc).__name__}: {exc}")

    def _fail(self, error: str) -> None:
        log.error("deployment.failed deployment_id=%d error=%r", self.deployment_id, error)
        self._report(self.deployment_id, "failed", error=error[:MAX_ERROR_CHARS])

    def _deploy(self) -> None:
        self._check_signatures()
        self._check_files()
        self._admit()
        self._progress(0)  # even when every file is already stored, the plane sees the download start
        paths = self._download()
        self._report(self.deployment_id, "verifying", bytes_done=self.bytes_total, bytes_total=self.bytes_total)
        self._verify(paths)
        self._load(paths)

    # --- steps --------------------------------------------------------------

    def _check_files(self) -> None:
        files = self.desired.files
        roles = [f.role for f in files]
        for role in _SINGLE_ROLES:
            if roles.count(role) > 1:
                raise DeploymentError(f"deployment lists two {role} files")
        if "model" not in roles:
            raise DeploymentError("deployment lists no model file")
        if self.desired.inference.task == "generate":
            names = [f.filename for f in files]
            if len(set(names)) != len(names):
                raise DeploymentError("a generate bundle lists two files of one name")
            if "config" not in roles:
                raise DeploymentError("a generate bundle needs its config file (genai_config.json)")
        elif roles.count("tokenizer") > 1:
            raise DeploymentError("deployment lists two tokenizer files")
        elif not set(roles) <= {"model", "tokenizer"}:
            raise DeploymentError(f"a {self.desired.inference.task} model takes model and tokenizer files only")

    def _check_signatures(self) -> None:
        """Refuse any file the plane did not sign, before a byte is fetched or anything activated.

        The chunk hashes are part of what is signed, so a verified manifest also vouches
        for every chunk the transfer checks against it.
        """
        if self._plane_key is None:
            # Only reached with security.allow_unsigned: without it the agent refused the message.
            log.warning(
                "deployment.UNVERIFIED deployment_id=%d: security.allow_unsigned is true, so neither the "
                "desired message nor the files' signatures are checked",
                self.deployment_id,
            )
            return
        for file in self.desired.files:
            signing.verify_manifest(self._plane_key, file, model=self.desired.model, version=self.desired.version)

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.desired.files)

    def _admit(self) -> None:
        reason = admission.refusal(self.desired, self.data_dir, self._measure(self.data_dir), self.rules)
        if reason is not None:
            raise Ineligible(reason)

    def _download(self) -> dict[str, Path]:
        """Every file, fetched and stored; their paths by sha256."""
        paths: dict[str, Path] = {}
        done_before = 0
        for file in self.desired.files:
            if file.sha256 not in paths:
                paths[file.sha256] = self._download_one(file, done_before)
            done_before += file.size
        return paths

    def _download_one(self, file: wire.FileManifest, done_before: int) -> Path:
        self._transfer = Transfer(
            file,
            data_dir=self.data_dir,
            request=lambda indexes: self._request_chunks(self.deployment_id, file.sha256, indexes),
            settings=self.settings,
            clock=self.clock,
            on_progress=lambda done, _total: self._progress(done_before + done),
            cancel=self._cancelled,
        )
        try:
            return self._transfer.run()
        finally:
            self._transfer = None

    def _progress(self, done: int) -> None:
        self.bytes_done = done
        now = self.clock.monotonic()
        if now - self._reported_at < PROGRESS_EVERY_S:
            return
        self._reported_at = now
        self._report(self.deployment_id, "downloading", bytes_done=done, bytes_total=self.bytes_total)

    def _verify(self, paths: dict[str, Path]) -> None:
        # The transfer checked each file as it stored it; this catches a disk that changed it since.
        for sha256, path in paths.items():
            actual = manifest.file_sha256(path)
            if actual != sha256:
                path.unlink(missing_ok=True)
                raise DeploymentError(f"stored file {path.name} hashes to {actual}, not {sha256}")

    def _load(self, paths: dict[str, Path]) -> None:
        active = active_from(self.desired)
        # Into the idle slot: the current model serves on until this one has passed its self-test.
        loaded = load_deployment(self.data_dir, active, self.generation, verified=paths)
        run_selftest(loaded, self.desired.selftest)
        if self._cancelled.is_set():
            raise TransferCancelled("a newer deployment arrived while this one was loading")
        self._activate(loaded, active)
        self._report(
            self.deployment_id,
            "active",
            sha256=active.sha256,
            bytes_done=self.bytes_total,
            bytes_total=self.bytes_total,
        )
