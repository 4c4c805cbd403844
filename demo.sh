#!/usr/bin/env bash
# Set up if needed, then run the main job on the default model (Gemma-3-270M, from PyPI): the
# latent-language report (Wendler et al.), French -> Chinese on CLDR names. Open out/latent-fr-zh/index.html.
source "$(dirname "$0")/scripts/env.sh"
jaxlens latent-language --model gemma3-270m --source fr --target zh --max-items 100 --out out/latent-fr-zh --overwrite "$@"
