#!/usr/bin/env bash
# Print the path of an emulated Linux aarch64 root (Debian bookworm arm64) with the agent's
# requirements installed in /opt/edgefleet/venv, building it first if the cache has none.
#
# Roots are kept in $EDGEFLEET_CACHE/arm64 (default ~/.cache/edgefleet/arm64):
#   base-<key>  debootstrap's result (0.25 GB), keyed on this recipe: 5.3 min to make, measured
#               on 2 cores shared with other work
#   root-<key>  a copy of the base plus the venv (0.5 GB), keyed on requirements/agent.txt and
#               this recipe: a change to the requirements rebuilds only this (2.8 min)
# Each is built in a <name>.tmp.<pid> directory and renamed into place only once finished
# and checked, so a build that failed or was killed is never reused; leftovers are removed
# by the next build. Builds are serialised by a lock. Roots and bases unused for two days
# are removed. Needs root (debootstrap, chroot, mount). Build output goes to <name>.log
# beside it; on failure its tail is printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=scripts/arm64
CACHE=${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}/arm64
SUITE=bookworm
# Bumped by hand whenever a step below changes what a base or a root holds.
BASE_RECIPE="1 $SUITE minbase python3,python3-venv,ca-certificates"
ROOT_RECIPE="1 venv only-binary"

log() { echo "arm64: $*" >&2; }

ensure_emulation() {
  if ! command -v debootstrap >/dev/null || ! command -v update-binfmts >/dev/null \
      || [ ! -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]; then
    log "installing qemu-user-static, binfmt-support and debootstrap"
    apt-get update -qq && apt-get install -y -qq qemu-user-static binfmt-support debootstrap >/dev/null
  fi
  if ! mountpoint -q /proc/sys/fs/binfmt_misc; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  fi
  if [ "$(head -1 /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null)" != enabled ]; then
    update-binfmts --enable qemu-aarch64
  fi
}

mirror() {
  # The Debian mirror this machine's apt already uses (deb822 or one-line sources).
  local url
  url=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '/^URIs:/ {print $2}' | grep -E '/debian/?$' | head -1 || true)
  [ -n "$url" ] || url=$(awk '$1 == "deb" && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  echo "${ARM64_MIRROR:-${url:-http://deb.debian.org/debian}}"
}

key() { { echo "$1"; cat "${@:2}" 2>/dev/null; } | sha256sum | cut -c1-16; }

fail() {
  # $1: the build's log; $2: the root being built.
  log "building $(basename "$2") failed; the last lines of $1:"
  tail -n 60 "$1" >&2 || true
  if [ -f "$2/debootstrap/debootstrap.log" ]; then
    log "the last lines of debootstrap.log:"
    tail -n 30 "$2/debootstrap/debootstrap.log" >&2
  fi
  rm -rf --one-file-system "$2"
  exit 1
}

build_base() {
  local dir=$1 log=$2
  log "debootstrap $SUITE arm64 from $(mirror) (about 5 min); log: $log"
  : >"$log"
  debootstrap --arch=arm64 --foreign --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$dir" "$(mirror)" >>"$log" 2>&1 || return 1
  touch "$dir/.edgefleet-root"
  "$HERE/run.sh" "$dir" -- /debootstrap/debootstrap --second-stage >>"$log" 2>&1 || return 1
  "$HERE/run.sh" "$dir" -- apt-get clean >>"$log" 2>&1
}

build_root() {
  local base=$1 dir=$2 log=$3
  log "installing requirements/agent.txt into a copy of $(basename "$base") (about 3 min); log: $log"
  : >"$log"
  cp -a "$base" "$dir"
  # pip reaches the registry through this machine's TLS setup: its CAs go in as well.
  cp /usr/local/share/ca-certificates/*.crt "$dir/usr/local/share/ca-certificates/" 2>/dev/null || true
  cp /etc/resolv.conf "$dir/etc/resolv.conf"
  mkdir -p "$dir/opt/edgefleet/src"
  cp requirements/agent.txt "$dir/opt/edgefleet/requirements.txt"
  local run=("$HERE/run.sh" "$dir" --)
  {
    "${run[@]}" update-ca-certificates &&
    "${run[@]}" python3 -m venv /opt/edgefleet/venv &&
    "${run[@]}" /opt/edgefleet/venv/bin/pip install --no-input --disable-pip-version-check \
      --only-binary=:all: -r /opt/edgefleet/requirements.txt &&
    # A root whose onnxruntime cannot even be imported is no root.
    "${run[@]}" /opt/edgefleet/venv/bin/python -c \
      'import platform, onnxruntime, numpy, tokenizers, cryptography, paho.mqtt, msgspec, psutil
print(platform.machine(), "onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())'
  } >>"$log" 2>&1
}

remove_unused() {
  # Another work tree's requirements may need another root, in use right now: only those
  # unused for two days go (their marker is touched at each use).
  local dir
  for dir in "$CACHE"/root-* "$CACHE"/base-*; do
    [ -d "$dir" ] && [ "$dir" != "$1" ] && [ "$dir" != "$2" ] || continue
    if [ -z "$(find "$dir" -maxdepth 1 -name '.edgefleet-*' -mtime -2)" ]; then
      rm -rf --one-file-system "$dir" "$dir.log"
    fi
  done
}

main() {
  [ "$(id -u)" = 0 ] || { log "needs root (debootstrap, chroot and mount)"; exit 1; }
  ensure_emulation
  mkdir -p "$CACHE"
  local base="$CACHE/base-$(key "$BASE_RECIPE")"
  local root="$CACHE/root-$(key "$BASE_RECIPE $ROOT_RECIPE" requirements/agent.txt)"
  if [ -f "$root/.edgefleet-complete" ]; then touch "$root/.edgefleet-complete"; echo "$root"; return; fi

  exec 9>"$CACHE/.lock"
  flock 9  # another build of the same root: wait for it, then reuse its result
  if [ ! -f "$root/.edgefleet-complete" ]; then
    # Under the lock, every *.tmp.* is a dead build's.
    find "$CACHE" -maxdepth 1 -name '*.tmp.*' -exec rm -rf --one-file-system {} +
    if [ ! -d "$base" ]; then
      local t0=$SECONDS
      build_base "$base.tmp.$$" "$base.log" || fail "$base.log" "$base.tmp.$$"
      mv "$base.tmp.$$" "$base"
      log "base built in $((SECONDS - t0)) s"
    fi
    local t1=$SECONDS
    build_root "$base" "$root.tmp.$$" "$root.log" || fail "$root.log" "$root.tmp.$$"
    touch "$root.tmp.$$/.edgefleet-complete" "$base/.edgefleet-root"
    mv "$root.tmp.$$" "$root"
    log "root built in $((SECONDS - t1)) s: $(tail -1 "$root.log")"
    remove_unused "$root" "$base"
  fi
  echo "$root"
}

main "$@"; exit
