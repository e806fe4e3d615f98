#!/usr/bin/env bash
# Re-execute the book's notebooks top to bottom and write their outputs back in place.
#
#   bash scripts/execute_notebooks.sh                          # every notebook, full profile
#   bash scripts/execute_notebooks.sh --profile fast           # the quick profile of the tests
#   bash scripts/execute_notebooks.sh notebooks/02_classifier.ipynb
#   bash scripts/execute_notebooks.sh --no-setup ...           # skip scripts/setup_env.sh
#
# The committed outputs come from the full profile. Trained models are cached (ADVBOOK_CACHE,
# default ~/.cache/advbook), so a second run reuses them. A notebook with a failing cell is left
# unchanged and the command exits non-zero. Other options (--timeout, --kernel) go to
# scripts/execute_notebooks.py; see its --help.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

SETUP=1
ARGS=()
for arg in "$@"; do
  if [ "$arg" = "--no-setup" ]; then SETUP=0; else ARGS+=("$arg"); fi
done

if [ "$SETUP" = 1 ]; then
  bash "$ROOT/scripts/setup_env.sh"
fi
exec "${ADVBOOK_VENV:-$ROOT/.venv}/bin/python" "$ROOT/scripts/execute_notebooks.py" ${ARGS[@]+"${ARGS[@]}"}
