#!/usr/bin/env bash
# Check that requirements/agent.txt installs from binary wheels on every platform the agent
# supports, with nothing to compile on the device: Linux x86_64 and aarch64, macOS arm64.
# It downloads (into a temporary directory, through pip's cache) and installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}

declare -A PLATFORMS=(
  ["Linux x86_64"]="manylinux2014_x86_64 manylinux_2_28_x86_64"
  ["Linux aarch64"]="manylinux2014_aarch64 manylinux_2_28_aarch64"
  ["macOS arm64"]="macosx_11_0_arm64 macosx_14_0_arm64"
)

failed=0
for name in "Linux x86_64" "Linux aarch64" "macOS arm64"; do
  args=()
  for tag in ${PLATFORMS[$name]}; do args+=(--platform "$tag"); done
  dest=$(mktemp -d)
  if "$PIP" download --quiet --only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" \
      "${args[@]}" --dest "$dest" -r requirements/agent.txt 2> >(grep -v "^WARNING: Location" >&2); then
    onnxruntime=$(cd "$dest" && ls onnxruntime-*.whl)
    echo "check-agent-wheels: $name: $(ls "$dest" | wc -l) wheels, $onnxruntime"
  else
    echo "check-agent-wheels: $name: some requirement has no wheel for Python $PYTHON_VERSION (see above)" >&2
    failed=1
  fi
  rm -rf "$dest"
done
exit $failed
