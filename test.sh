#!/usr/bin/env bash
# Set up if needed, then run the whole test suite (parity vs transformers, real weights, 8-device mesh).
source "$(dirname "$0")/scripts/env.sh"
python -m pytest -q "$@"
