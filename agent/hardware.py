"""What this device is: the hardware profile it announces in its hello.

Everything here is best effort. A field the OS will not tell us is left empty
rather than failing the agent: the plane can still place a model without it.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Final

import psutil

from agent import __version__
from agent.contract import wire

MAX_CPU_FLAGS: Final = 256
_CPUINFO: Final = Path("/proc/cpuinfo")
_ASK_PROVIDERS: Final = "import json, onnxruntime; print(json.dumps(onnxruntime.get_available_providers()))"


def detect_profile(data_dir: Path) -> wire.HardwareProfile:
    return wire.HardwareProfile(
        arch=platform.machine() or "unknown",
        os=platform.system().lower() or "unknown",
        os_release=platform.release()[:200],
        cpu_model=cpu_model()[:200],
        cpu_count=os.cpu_count() or 1,
        cpu_flags=cpu_flags(),
        ram_bytes=psutil.virtual_memory().total,
        disk_free_bytes=disk_free_bytes(data_dir),
        providers=available_providers()[:32],
        agent_version=__version__,
    )


def available_providers() -> list[str]:
    """The execution providers this onnxruntime build offers, e.g. CPUExecutionProvider, CoreMLExecutionProvider."""
    if "onnxruntime" in sys.modules:  # a model is loaded: asking costs nothing
        providers: list[str] = sys.modules["onnxruntime"].get_available_providers()
        return providers
    return list(_providers_of_a_child())


@functools.cache
def _providers_of_a_child() -> tuple[str, ...]:
    # Importing onnxruntime adds ~25 MB to an agent that may idle for days without a
    # model; a child process asks instead, once, and exits.
    try:
        result = subprocess.run(
            [sys.executable, "-c", _ASK_PROVIDERS], capture_output=True, text=True, timeout=60, check=True
        )
        return tuple(json.loads(result.stdout))
    except (OSError, subprocess.SubprocessError, ValueError):
        import onnxruntime

        return tuple(onnxruntime.get_available_providers())


def cpu_model() -> str:
    if platform.system() == "Darwin":
        return _sysctl("machdep.cpu.brand_string")
    return _cpuinfo_field("model name", "Hardware", "Processor") or platform.processor()


def cpu_flags() -> list[str]:
    # x86 calls them "flags"; ARM kernels call them "Features".
    line = _cpuinfo_field("flags", "Features")
    return sorted(set(line.split()))[:MAX_CPU_FLAGS]


def disk_free_bytes(path: Path) -> int:
    try:
        return int(psutil.disk_usage(str(path)).free)
    except OSError:
        return 0


def _cpuinfo_field(*names: str) -> str:
    try:
        lines = _CPUINFO.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() in names:
            return value.strip()
    return ""


def _sysctl(name: str) -> str:
    try:
        result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout.strip()
