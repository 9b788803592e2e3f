#!/usr/bin/env bash
# README command 1: set up the environment, then run the main job on the embedded default:
# Observation (build the demo corpus) -> Knowledge (autoencoder step + the three-stage demo
# curriculum at the tiny preset) -> Analysis (held-out checks against the untrained model and the
# baselines, runs/demo/report.html). Re-running resumes every step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GRADIO_ANALYTICS_ENABLED=False
OUT=${OUT:-runs/demo}
U=.venv/bin/unimedvl
$U demo --out "$OUT" --workers "${WORKERS:-2}"
echo "== the trained model, now the default of ask / generate / serve =="
image=$(ls "$OUT"/sources/procedural/oct/*.png | head -1)
$U ask "$image" -q "Which kind of medical image is this?" --dtype fp32 --temperature 0 --max-new-tokens 16 --no-stream
