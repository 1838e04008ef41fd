"""What the running agent is doing, in ``<data_dir>/status.json``, for ``edgefleet-agent status``.

The agent rewrites the file atomically about once a second; the status command
only reads it, so it works without the agent's cooperation, as any user that can
read the data dir, and says so when the file has gone stale.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import msgspec

from agent.active import ActiveDeployment
from agent.files import write_atomic

if TYPE_CHECKING:
    from agent.deployment import DeploymentJob

FILENAME: Final = "status.json"
STALE_AFTER_S: Final = 10.0


class SlotInfo(msgspec.Struct, kw_only=True):
    slot: str
    deployment_id: int
    model: str
    version: str
    sha256: str


class Download(msgspec.Struct, kw_only=True):
    deployment_id: int
    model: str
    version: str
    bytes_done: int
    bytes_total: int


class Status(msgspec.Struct, kw_only=True):
    """One snapshot of the agent."""

    device_id: str
    pid: int
    updated_at: float
    connected: bool
    http_port: int | None
    current: SlotInfo | None
    previous: SlotInfo | None
    healthy: bool
    probation_left_s: float | None
    download: Download | None
    outbox_depth: int
    outbox_dropped: int


def slot_info(slot: str, deployment: ActiveDeployment | None) -> SlotInfo | None:
    if deployment is None:
        return None
    return SlotInfo(
        slot=slot,
        deployment_id=deployment.deployment_id,
        model=deployment.model,
        version=deployment.version,
        sha256=deployment.sha256,
    )


def download_info(job: DeploymentJob) -> Download:
    return Download(
        deployment_id=job.deployment_id,
        model=job.desired.model,
        version=job.desired.version,
        bytes_done=job.bytes_done,
        bytes_total=job.bytes_total,
    )


def save(data_dir: Path, status: Status) -> None:
    write_atomic(data_dir / FILENAME, msgspec.json.encode(status), sync=False)


def load(data_dir: Path) -> Status:
    """Raises OSError when there is no status file, msgspec.DecodeError when it is damaged."""
    return msgspec.json.decode((data_dir / FILENAME).read_bytes(), type=Status)


def describe(status: Status, now: float | None = None) -> str:
    """The human-readable form ``edgefleet-agent status`` prints."""
    now = time.time() if now is None else now
    age = now - status.updated_at
    running = age <= STALE_AFTER_S and _alive(status.pid)
    lines = [
        f"device       {status.device_id}",
        f"agent        {'running' if running else 'NOT RUNNING'} (pid {status.pid}, status {age:.0f}s old)",
        f"broker       {'connected' if status.connected else 'disconnected'}",
        f"local http   {f'127.0.0.1:{status.http_port}' if status.http_port else '-'}",
        f"current      {_slot(status.current)}{_health(status)}",
        f"previous     {_slot(status.previous)}",
        f"download     {_download(status.download)}",
        f"outbox       {status.outbox_depth} queued, {status.outbox_dropped} dropped",
    ]
    return "\n".join(lines)


def _slot(info: SlotInfo | None) -> str:
    if info is None:
        return "-"
    what = f"{info.model or '?'} {info.version or '?'}"
    return f"slot {info.slot}: {what} (deployment {info.deployment_id}, sha256 {info.sha256[:12]})"


def _health(status: Status) -> str:
    if status.current is None or status.healthy:
        return ""
    left = f", {status.probation_left_s:.0f}s left" if status.probation_left_s is not None else ""
    return f" [on probation{left}]"


def _download(download: Download | None) -> str:
    if download is None:
        return "-"
    share = download.bytes_done / download.bytes_total if download.bytes_total else 1.0
    return (
        f"deployment {download.deployment_id} {download.model} {download.version}: "
        f"{download.bytes_done}/{download.bytes_total} bytes ({share:.0%})"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True
