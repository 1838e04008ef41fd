"""Can this device take a version? Checked before the first byte is fetched.

Three checks, each from the desired message alone: free disk for what is still
to fetch, available RAM for the model, and the execution providers the version
needs. A device that fails one reports the deployment ``ineligible`` with the
reason and downloads nothing; it is not an error, the plane places the version
elsewhere.

RAM: loading an ONNX file, onnxruntime holds the file's bytes and its own copy of
the weights (prepacked, for quantised ops) until the session is built, so the peak
is about twice the file. ``ram_margin_mb`` covers the tokenizer, the session's
arena and the agent itself. Both are in the config, for devices that know better.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil

from agent import hardware
from agent.config import AdmissionConfig
from agent.contract import wire
from agent.transfer import artifact_path

MIB = 1024 * 1024


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """What the device has free now. Zero means the OS would not say, and that check is skipped."""

    disk_free_bytes: int
    ram_available_bytes: int
    providers: list[str]


Measure = Callable[[Path], Resources]


def measure(data_dir: Path) -> Resources:
    return Resources(
        disk_free_bytes=hardware.disk_free_bytes(data_dir),
        ram_available_bytes=int(psutil.virtual_memory().available),
        providers=hardware.available_providers(),
    )


def refusal(desired: wire.Desired, data_dir: Path, have: Resources, rules: AdmissionConfig) -> str | None:
    """Why this device cannot take ``desired``, or None when it can."""
    return _providers(desired, have) or _disk(desired, data_dir, have, rules) or _ram(desired, have, rules)


def _providers(desired: wire.Desired, have: Resources) -> str | None:
    missing = [p for p in desired.providers if p not in have.providers]
    if not missing:
        return None
    return (
        f"needs execution provider {', '.join(missing)}; this device has {', '.join(have.providers) or 'none'}. "
        "Install an onnxruntime build with it, or deploy a variant for this hardware"
    )


def _disk(desired: wire.Desired, data_dir: Path, have: Resources, rules: AdmissionConfig) -> str | None:
    to_fetch = sum(f.size for f in desired.files if not artifact_path(data_dir, f.sha256).is_file())
    needed = int(to_fetch * rules.disk_factor)
    if not have.disk_free_bytes or have.disk_free_bytes >= needed:
        return None
    return (
        f"needs {_mib(needed)} MiB of free disk ({rules.disk_factor:g}x the {_mib(to_fetch)} MiB to fetch); "
        f"{_mib(have.disk_free_bytes)} MiB free in {data_dir}. Free some space there and deploy again"
    )


def _ram(desired: wire.Desired, have: Resources, rules: AdmissionConfig) -> str | None:
    model_bytes = sum(f.size for f in desired.files if f.role in ("model", "model_data"))
    needed = int(model_bytes * rules.ram_factor) + rules.ram_margin_mb * MIB
    if not have.ram_available_bytes or have.ram_available_bytes >= needed:
        return None
    return (
        f"needs {_mib(needed)} MiB of available RAM to load a {_mib(model_bytes)} MiB model "
        f"({rules.ram_factor:g}x + {rules.ram_margin_mb} MiB); {_mib(have.ram_available_bytes)} MiB available. "
        "Deploy a smaller variant to this device"
    )


def _mib(size: int) -> str:
    return f"{size / MIB:.1f}"
