#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install everything the book
# and its tests need, plus this package in editable mode so `import utils` works from notebooks/.
# Idempotent: a second run with nothing changed takes seconds.  Sourced or run by the two README
# commands (scripts/build_book.sh, scripts/test.sh).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ADVBOOK_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' 2>/dev/null; then
  echo "error: Python >= 3.10 is needed (found: $("$PY" --version 2>&1 || echo none))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating virtual environment in $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.advbook-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/requirements-nodeps.txt" "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c 'import utils, torch, torchvision, torchattacks' 2>/dev/null; then
  echo "environment up to date ($VENV)"
else
  echo "installing requirements into $VENV (the first time downloads PyTorch: a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -r "$ROOT/requirements.txt"
  "$VENV/bin/python" -m pip install --quiet --no-deps -r "$ROOT/requirements-nodeps.txt"
  "$VENV/bin/python" -m pip install --quiet --no-deps -e "$ROOT"
  "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
  "$VENV/bin/python" -c 'import torch, torchvision; torchvision.ops.nms' # fails loudly on a torch/torchvision mismatch
  echo "$WANT" > "$STAMP"
fi
