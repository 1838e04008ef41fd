"""Hardware classes from a device's reported profile. No Django here."""

_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def hardware_class(arch: str, os_name: str) -> str:
    """``linux-x86_64``, ``linux-aarch64`` or ``darwin-arm64``; empty when unknown."""
    arch = arch.lower()
    os_name = os_name.lower()
    if os_name == "darwin" and arch in ("arm64", "aarch64"):
        return "darwin-arm64"
    if os_name == "linux":
        arch = _ARCH_ALIASES.get(arch, arch)
        if arch in ("x86_64", "aarch64"):
            return f"linux-{arch}"
    return ""


# CPU flags worth naming: what decides which model variant runs fast (int8 dot products,
# fp16, wide vectors). A device reports a hundred flags; operators read these.
NOTABLE_CPU_FLAGS = ("avx", "avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c", "amx_tile", "neon",
                     "asimd", "asimddp", "sve", "fp16", "i8mm")  # fmt: skip


def cpu_features(flags: list[str]) -> str:
    """``avx2, fma, f16c (of 112 flags)``: the flags that matter for inference, not all of them."""
    present = set(flags)
    notable = [f for f in NOTABLE_CPU_FLAGS if f in present]
    count = f"{len(present)} flag{'' if len(present) == 1 else 's'}"
    return f"{', '.join(notable) or 'none of note'} (of {count})"
