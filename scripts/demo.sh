#!/usr/bin/env bash
# README command 1: set up the environment, then run the main job on the embedded default:
# Observation (build the demo corpus) -> Knowledge (the three-stage demo curriculum at the tiny
# preset) -> Analysis (ask and generate with the trained model). Re-running resumes every step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export GRADIO_ANALYTICS_ENABLED=False
OUT=${OUT:-runs/demo}
U=.venv/bin/unimedvl
echo "== Observation: demo corpus =="
$U data demo --out "$OUT" --workers "${WORKERS:-2}"
echo "== Knowledge: demo curriculum (3 stages, tiny preset) =="
$U train demo --data "$OUT/dataset" --out "$OUT/train" --resume
$U export "$OUT/train" --out "$OUT/model"
echo "== Analysis: the trained model answers and draws =="
$U ask -m "$OUT/model" "$OUT/sources/procedural/cxr/finding_00.png" -q "What is the main finding on this chest radiograph?" \
  --dtype fp32 --temperature 0 --max-new-tokens 24 --no-stream
$U generate "Frontal chest radiograph demonstrating a focal lung opacity." -m "$OUT/model" -o "$OUT/generated_cxr.png" \
  --dtype fp32 --height 64 --width 64 --steps 20
echo "dataset card: $OUT/dataset/README.md; training metrics: $OUT/train/metrics.jsonl; model: $OUT/model"
