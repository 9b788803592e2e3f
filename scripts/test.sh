#!/usr/bin/env bash
# README command 2: set up the environment, then run the test suite.
# The reference fixtures are expected in ../shared (override with UNIMEDVL_SHARED=/path/to/shared).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
export GRADIO_ANALYTICS_ENABLED=False
.venv/bin/python -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: treating as a failure" >&2
  exit 1
fi
exit "$status"
