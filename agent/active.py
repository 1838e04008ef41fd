"""The deployment this device runs, saved in ``<data_dir>/active.json``.

It lets a restarted agent load its model at start-up with no network at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from agent.contract import wire
from agent.files import write_atomic
from agent.runtime import ModelInfo

log = logging.getLogger(__name__)

FILENAME = "active.json"


class ActiveDeployment(msgspec.Struct, kw_only=True):
    """What is loaded now, and which artifacts it was loaded from."""

    deployment_id: int
    sha256: str
    tokenizer_sha256: str | None = None
    inference: wire.InferenceSpec = wire.InferenceSpec()
    model: str = ""
    version: str = ""
    # Every file by its manifest filename, for a generate bundle (agent.bundles); empty otherwise.
    files: dict[str, str] = {}

    @property
    def hashes(self) -> set[str]:
        """Every artifact this deployment loads from."""
        return {sha for sha in (self.sha256, self.tokenizer_sha256, *self.files.values()) if sha}

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            deployment_id=self.deployment_id,
            sha256=self.sha256,
            model=self.model,
            version=self.version,
            tokenizer_sha256=self.tokenizer_sha256,
        )

    @property
    def active_model(self) -> wire.ActiveModel:
        return wire.ActiveModel(deployment_id=self.deployment_id, sha256=self.sha256)

    def runs_same_files(self, other: ActiveDeployment) -> bool:
        """True when ``other`` loads exactly what this one does, whatever its deployment id."""
        return (self.sha256, self.tokenizer_sha256, self.inference) == (
            other.sha256,
            other.tokenizer_sha256,
            other.inference,
        )

    def runs_same_model(self, desired: wire.Desired) -> bool:
        """True when ``desired`` would load exactly what is loaded now."""
        new = active_from(desired) if any(f.role == "model" for f in desired.files) else None
        return new is not None and (new.sha256, new.tokenizer_sha256, new.inference, new.files) == (
            self.sha256,
            self.tokenizer_sha256,
            self.inference,
            self.files,
        )


def load_active(data_dir: Path) -> ActiveDeployment | None:
    path = data_dir / FILENAME
    try:
        return msgspec.json.decode(path.read_bytes(), type=ActiveDeployment)
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as exc:
        log.error("active.unreadable path=%s error=%r", path, str(exc))
        return None


def save_active(data_dir: Path, active: ActiveDeployment) -> None:
    write_atomic(data_dir / FILENAME, msgspec.json.encode(active))


def active_from(desired: wire.Desired) -> ActiveDeployment:
    files = {f.role: f.sha256 for f in desired.files}
    assert desired.deployment_id is not None and "model" in files
    return ActiveDeployment(
        deployment_id=desired.deployment_id,
        sha256=files["model"],
        # A generate bundle may hold two tokenizer files; its ``files`` name them all.
        tokenizer_sha256=None if desired.inference.task == "generate" else files.get("tokenizer"),
        inference=desired.inference,
        model=desired.model,
        version=desired.version,
        files=bundle_files(desired),
    )


def bundle_files(desired: wire.Desired) -> dict[str, str]:
    """Filename to hash for a generate bundle; empty for other tasks, whose files go by role."""
    if desired.inference.task != "generate":
        return {}
    return {f.filename: f.sha256 for f in desired.files}
