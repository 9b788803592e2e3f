#!/usr/bin/env bash
# README command 1: set up the environment, then run the main job on the embedded default.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GRADIO_ANALYTICS_ENABLED=False
OUT=${OUT:-runs/demo}
# Observation: build the embedded demo corpus from packaged sample files (resumes if interrupted).
.venv/bin/unimedvl data demo --out "$OUT" --workers "${WORKERS:-2}"
# Knowledge and Analysis (curriculum training, evaluation) join as they land; describe the model.
.venv/bin/unimedvl info --preset tiny
echo "dataset card: $OUT/dataset/README.md"
