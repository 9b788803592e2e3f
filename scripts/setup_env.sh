#!/usr/bin/env bash
# Create ./.venv and install unimedvl with every optional feature and pinned dependencies.
# Re-running is cheap: nothing is reinstalled unless pyproject.toml or the constraints changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
CONSTRAINTS=requirements/constraints.txt
stamp="$VENV/.unimedvl-installed"
want=$(cat pyproject.toml "$CONSTRAINTS" | sha256sum | cut -d' ' -f1)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing torch (CPU) and unimedvl[all] with pinned dependencies"
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS" torch
  "$VENV/bin/pip" install -q --disable-pip-version-check -c "$CONSTRAINTS" -e '.[all]'
  echo "$want" > "$stamp"
fi
