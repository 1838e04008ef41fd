#!/usr/bin/env bash
# Run a command inside an arm64 root made by scripts/arm64/root.sh, under qemu-aarch64.
#
#   scripts/arm64/run.sh ROOT [--bind DIR[:INSIDE]]... [--env NAME=VALUE]... -- COMMAND [ARG...]
#
# It runs in a mount namespace of its own (unshare -m): /proc, /dev, /tmp, the ARM cpuinfo
# and every --bind (the host's DIR, read-write, at INSIDE or else at the same path) exist only there,
# so they vanish when COMMAND exits, however it ends: nothing is left mounted on the host
# and the cached root is never written through a mount. COMMAND is exec'd, so a signal
# sent to this script's pid reaches it. The environment inside is only --env's and a few
# defaults: the host's PIP_*, VIRTUAL_ENV or PYTHONPATH would not make sense there.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "${EDGEFLEET_ARM64_NS:-}" != "$$" ]; then
  # unshare execs (no fork) for a mount namespace alone: $$ stays this process.
  EDGEFLEET_ARM64_NS=$$ exec unshare --mount --propagation private -- "$0" "$@"
fi

usage() { echo "usage: $0 ROOT [--bind DIR[:INSIDE]]... [--env NAME=VALUE]... -- COMMAND [ARG...]" >&2; exit 2; }
[ $# -ge 1 ] || usage
root=$1; shift
[ -f "$root/.edgefleet-root" ] || { echo "arm64: $root is not a finished root (scripts/arm64/root.sh builds one)" >&2; exit 2; }
binds=()
envs=(
  "PATH=/opt/edgefleet/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
  "HOME=/root" "LANG=C.UTF-8" "TERM=dumb"
  # The fastest CPU qemu 7.2 emulates for this work (measured); it matches the cpuinfo below.
  "QEMU_CPU=${QEMU_CPU:-neoverse-n1}"
)
while [ $# -gt 0 ]; do
  case $1 in
    --bind) binds+=("$2"); shift 2 ;;
    --env) envs+=("$2"); shift 2 ;;
    --) shift; break ;;
    *) usage ;;
  esac
done
[ $# -ge 1 ] || usage

mount -t proc proc "$root/proc"
# qemu-user passes the host's x86 /proc/cpuinfo through; onnxruntime's CPU detection finds no
# ARM processor in it and `import onnxruntime` segfaults. An ARM (Neoverse-N1) one fixes that.
mount --bind "$HERE/cpuinfo" "$root/proc/cpuinfo"
mount --rbind /dev "$root/dev"
mount --rbind /sys "$root/sys"
mount -t tmpfs tmpfs "$root/tmp"
for bind in "${binds[@]}"; do
  dir=$(realpath "${bind%%:*}")
  inside=$dir
  [[ $bind == *:* ]] && inside=${bind#*:}
  mkdir -p "$root$inside"  # under /tmp, in the tmpfs above, not in the cached root
  mount --bind "$dir" "$root$inside"
done
exec env -i "${envs[@]}" chroot "$root" "$@"
