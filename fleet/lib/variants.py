"""Which variant of a version a device should run, from its reported hardware. No Django here.

The fallback chain (docs/models.md tells it for operators):

1. A pin for the device, then a pin for one of its tags, wins if the pinned variant is offered.
2. Only offered variants count: ready, and not rejected or still being evaluated.
3. A variant built for the device's hardware class beats one built for any hardware.
4. Variants that would not fit in the device's memory budget are dropped, unless none fits.
5. Among the rest, the device's precision preference decides; then the smallest file.
   Generative bundles (GGUF conversions) go by their measured peak memory instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# The share of a device's RAM a model may take while it loads and runs.
RAM_BUDGET_FRACTION = 0.5
# The recipe tool of the GGUF converter's bundles (fleet.lib.gguf.convert).
GENERATIVE_TOOL = "fleet.lib.gguf.convert"
# Without a measured peak, loading takes about this many times the file's size.
UNMEASURED_MEMORY_FACTOR = 2.5

_VNNI_FLAGS = {"avx512_vnni", "avx_vnni", "avx512vnni", "amx_int8"}
_DOTPROD_FLAGS = {"asimddp", "dotprod"}


@dataclass(frozen=True)
class DeviceProfile:
    arch: str = ""
    os: str = ""
    hardware_class: str = ""
    ram_bytes: int = 0
    providers: tuple[str, ...] = ()
    cpu_flags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Candidate:
    id: int
    precision: str
    hardware_class: str
    size: int
    peak_memory_bytes: int | None = None
    recipe: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def memory_needed(self) -> int:
        return self.peak_memory_bytes or int(self.size * UNMEASURED_MEMORY_FACTOR)


def _arch(profile: DeviceProfile) -> str:
    arch = profile.arch.lower()
    return {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def precision_preference(profile: DeviceProfile) -> list[str]:
    """Precisions from best to worst for this device.

    - x86_64 with VNNI (avx512_vnni, avx_vnni): int8 runs on the int8 dot-product units.
    - x86_64 without VNNI: int8 still, but only if built with reduce_range (see ``usable``).
    - aarch64 with dotprod (asimddp): int8 on the SDOT instructions.
    - aarch64 without dotprod: int4 weight-only (dequantized into fp32 kernels), then fp32.
    - macOS arm64 with the CoreML provider: fp16 on the GPU/Neural Engine; without it, as aarch64 with dotprod.
    """
    flags = {f.lower() for f in profile.cpu_flags}
    arch = _arch(profile)
    if profile.os.lower() == "darwin" and arch == "aarch64":
        if "CoreMLExecutionProvider" in profile.providers:
            return ["fp16", "int8", "fp32", "int4"]
        return ["int8", "int4", "fp32", "fp16"]
    if arch == "aarch64":
        if flags & _DOTPROD_FLAGS:
            return ["int8", "int4", "fp32", "fp16"]
        return ["int4", "fp32", "int8", "fp16"]
    return ["int8", "int4", "fp32", "fp16"]


def usable(profile: DeviceProfile, candidate: Candidate) -> bool:
    """False for an int8 variant the plane built without reduce_range, on a CPU without VNNI.

    Such a variant's u8*s8 products saturate there. An uploaded int8 file carries no recipe:
    how it was quantized is its uploader's knowledge, so it is offered (docs/models.md).
    """
    if candidate.precision != "int8" or _arch(profile) != "x86_64":
        return True
    parameters = candidate.recipe.get("parameters") if candidate.recipe else None
    if not isinstance(parameters, dict):
        return True
    has_vnni = bool({f.lower() for f in profile.cpu_flags} & _VNNI_FLAGS)
    return has_vnni or bool(parameters.get("reduce_range", False))


def choose_variant(
    profile: DeviceProfile, candidates: Sequence[Candidate], *, pinned: Sequence[int] = ()
) -> Candidate | None:
    """The best offered candidate for the device; ``pinned`` lists pinned ids, most specific first."""
    by_id = {c.id: c for c in candidates}
    for pin in pinned:
        if pin in by_id:
            return by_id[pin]
    for hardware_class in (profile.hardware_class, "any"):
        group = [c for c in candidates if hardware_class and c.hardware_class == hardware_class]
        group = [c for c in group if usable(profile, c)]
        if not group:
            continue
        if profile.ram_bytes:
            budget = profile.ram_bytes * RAM_BUDGET_FRACTION
            fitting = [c for c in group if c.memory_needed <= budget]
            # None fits: offer the smallest, and let the agent's admission check say so.
            group = fitting or [min(group, key=lambda c: c.memory_needed)]
        if all(c.recipe.get("tool") == GENERATIVE_TOOL for c in group):
            # A generative bundle's 4 and 8 bits run on the same MatMulNBits int8 kernels, so
            # precision says nothing of speed: the smallest measured peak is also the fastest
            # (SmolLM2, tok/s per CPU-second: the 4-bit repack 71 and 263 MB, int8 59 and 303 MB).
            return min(group, key=lambda c: (c.memory_needed, c.size))
        order = precision_preference(profile)
        return min(group, key=lambda c: (order.index(c.precision) if c.precision in order else len(order), c.size))
    return None
