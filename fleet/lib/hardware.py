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
