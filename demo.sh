#!/usr/bin/env bash
# Set up if needed, then run the main job on the default model (Gemma-3-270M, from PyPI).
source "$(dirname "$0")/scripts/env.sh"
jaxlens lens --out out/lens.json "$@"
