"""The deployment this device runs, saved in ``<data_dir>/active.json``.

It lets a restarted agent load its model at start-up with no network at all.
"""

from __future__ import annotations

import logging
from pathlib import Path

import msgspec

from agent import wire
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
        files = {f.role: f.sha256 for f in desired.files}
        return (files.get("model"), files.get("tokenizer"), desired.inference) == (
            self.sha256,
            self.tokenizer_sha256,
            self.inference,
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
        tokenizer_sha256=files.get("tokenizer"),
        inference=desired.inference,
        model=desired.model,
        version=desired.version,
    )
