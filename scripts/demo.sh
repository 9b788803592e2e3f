#!/usr/bin/env bash
# README command 1: set up the environment, then run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GRADIO_ANALYTICS_ENABLED=False
# The main job (dataset -> curriculum -> evaluation) is not wired yet; describe the bundled tiny model.
.venv/bin/unimedvl info --preset tiny "$@"
