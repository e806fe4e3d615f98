#!/usr/bin/env bash
# The whole test suite, from a fresh clone: set up the environment, build the HTML book (warnings are
# errors), then one pytest run over
#   * the unit tests of utils/ (tests/),
#   * every notebook executed top to bottom in the fast profile by nbval (notebooks/),
#   * the real-browser test of every built page (headless Chromium; skipped, with the reason, where
#     Chromium cannot be had).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k energy`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$(date +%s)

bash scripts/setup_env.sh
PY="$ROOT/.venv/bin/python"

# Headless Chromium for the browser test: Debian's package, never a browser download.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser test"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will report itself skipped"
fi

bash scripts/build_book.sh

# The notebooks train their models afresh in a cache of the test run's own (data stays cached).
export ADVBOOK_PROFILE=fast
# One thread per process: on a machine shared with other jobs, two PyTorch threads stall each other
# (small attack batches ran up to 10 times slower). Instead, pytest-xdist runs the test files in
# ADVBOOK_TEST_WORKERS processes (default: 2, the cores of the project's machines; 1 runs them one
# after another). Each notebook stays in one worker (--dist loadscope), and two notebooks that need the
# same model wait for each other on the model cache's lock instead of both training it.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
WORKERS="${ADVBOOK_TEST_WORKERS:-2}"
export ADVBOOK_CACHE="${ADVBOOK_TEST_CACHE:-$ROOT/.cache/test}"
rm -rf "$ADVBOOK_CACHE/models"

set +e
"$PY" -m pytest tests notebooks --nbval-lax --nbval-current-env -p no:cacheprovider -rs \
  -n "$WORKERS" --dist loadscope "$@"
STATUS=$?
set -e
echo "test suite finished in $(( $(date +%s) - START )) s (exit $STATUS)"
exit $STATUS
