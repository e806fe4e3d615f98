#!/usr/bin/env bash
# Build the book's HTML into _build/html, ready to be read offline.
#
#   bash scripts/build_book.sh
#
# 1. sets up the Python environment in .venv (scripts/setup_env.sh; quick when nothing changed),
# 2. installs the pinned browser assets with npm (MathJax, RequireJS, the Jupyter widget manager)
#    and stages the files the pages load in _assets/, which the build copies into the site,
# 3. runs `jupyter-book build` with warnings treated as errors,
# 4. says where the HTML is and how to open it.
#
# The notebooks are not executed here: the book shows the outputs committed with them.
# Environment: ADVBOOK_VENV (default .venv), ADVBOOK_SKIP_SETUP=1 to use an existing environment
# as it is, PYTHON (the interpreter setup_env.sh creates the environment with).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${ADVBOOK_VENV:-$ROOT/.venv}"
START=$(date +%s)

say() { printf '==> %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# --- 1. Python environment ------------------------------------------------------------------
if [ "${ADVBOOK_SKIP_SETUP:-0}" = "1" ]; then
  say "using the existing environment in $VENV (ADVBOOK_SKIP_SETUP=1)"
else
  [ -f scripts/setup_env.sh ] || die "scripts/setup_env.sh is missing; is this a complete clone?"
  say "setting up the Python environment"
  bash scripts/setup_env.sh
fi
JB="$VENV/bin/jupyter-book"
[ -x "$JB" ] || die "jupyter-book not found in $VENV; run: bash scripts/setup_env.sh"

# --- 2. Browser assets ----------------------------------------------------------------------
# node_modules/ is reinstalled with `npm ci` only when package-lock.json changed since the last
# install (its hash is kept in node_modules/.advbook-lock) or a file the pages need is missing.
LOCK_HASH="$(sha256sum package-lock.json | cut -c1-16)"
STAMP=node_modules/.advbook-lock
NEEDED=(node_modules/mathjax/es5/tex-mml-chtml.js node_modules/requirejs/require.js
        node_modules/@jupyter-widgets/html-manager/dist/embed-amd.js)
assets_ok() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$LOCK_HASH" ] || return 1
  for f in "${NEEDED[@]}"; do [ -f "$f" ] || return 1; done
}
if assets_ok; then
  say "browser assets up to date (node_modules/)"
else
  command -v npm >/dev/null 2>&1 \
    || die "npm is needed to fetch MathJax and the widget manager: install Node.js 18 or newer (https://nodejs.org, or: sudo apt-get install nodejs npm) and run this again."
  say "installing browser assets with npm ci"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  echo "$LOCK_HASH" > "$STAMP"
fi

# Stage only what the pages load.  Sphinx's html_extra_path (see _config.yml) copies _assets/
# into the site, so _assets/_static/offline/ ends up as _build/html/_static/offline/.
VENDOR=_assets/_static/offline
rm -rf _assets
mkdir -p "$VENDOR/mathjax/es5/output" "$VENDOR/requirejs" "$VENDOR/html-manager/dist"

# MathJax 3: the combined TeX/MathML-to-CommonHTML component, plus everything it may load
# lazily from its own folder: TeX extensions (input/), the CommonHTML fonts (output/chtml/),
# the accessibility and menu modules (a11y/, ui/, sre/) and the small loader components.
MJ=node_modules/mathjax
cp "$MJ/LICENSE" "$VENDOR/mathjax/"
cp "$MJ"/es5/{tex-mml-chtml.js,core.js,loader.js,startup.js} "$VENDOR/mathjax/es5/"
cp -r "$MJ"/es5/{input,a11y,ui,sre,adaptors} "$VENDOR/mathjax/es5/"
cp -r "$MJ/es5/output/chtml" "$MJ/es5/output/chtml.js" "$VENDOR/mathjax/es5/output/"

# RequireJS, which the widget manager's AMD build needs (its licence is in the file's header).
cp node_modules/requirejs/require.js "$VENDOR/requirejs/"

# The widget manager renders the saved widget state; its bundle loads its icon fonts from the
# folder it was loaded from, so those come too (the source map and the other builds do not).
HM=node_modules/@jupyter-widgets/html-manager
cp "$HM/dist/embed-amd.js" "$VENDOR/html-manager/dist/"
for f in "$HM"/dist/*.{woff2,woff,ttf,eot,svg} "$HM"/dist/*.LICENSE.txt; do
  if [ -e "$f" ]; then cp "$f" "$VENDOR/html-manager/dist/"; fi
done
if [ -f "$HM/LICENSE" ]; then cp "$HM/LICENSE" "$VENDOR/html-manager/"; fi
# The book's own glue between RequireJS, the widget manager and MathJax 3.
cp book/assets/jupyter-widgets-setup.js "$VENDOR/"
# The book's stylesheet (html_css_files in _config.yml).
cp book/assets/book.css "$VENDOR/"
say "staged $(du -sh _assets | cut -f1) of browser assets in _assets/"

# --- 3. Build -------------------------------------------------------------------------------
say "building the book (warnings are errors)"
# --all: rebuild every page, so that the navigation of unchanged pages follows a changed _toc.yml
# (an incremental Sphinx build keeps their old previous/next links).
"$JB" build "$ROOT" --builder html --all -W -n --keep-going

OUT="$ROOT/_build/html"
[ -f "$OUT/index.html" ] || die "the build finished without producing $OUT/index.html"
# A final guard: no page may load a script or a stylesheet from another host.
EXTERNAL='<(script|link)[^>]*(src|href)="(https?:)?//[^"]*"'
if grep -rEhoq --include='*.html' "$EXTERNAL" "$OUT"; then
  grep -rEho --include='*.html' "$EXTERNAL" "$OUT" | sort -u >&2
  die "some pages load files from the network (listed above)"
fi

# --- 4. Where it is -------------------------------------------------------------------------
SECONDS_TAKEN=$(( $(date +%s) - START ))
cat <<EOF

The book is built (${SECONDS_TAKEN}s): $OUT
Read it offline through a local web server (equations, fonts and widgets need one):

    $VENV/bin/python -m http.server --bind 127.0.0.1 --directory "$OUT" 8000

then open http://127.0.0.1:8000/ in a browser.  Opening $OUT/index.html directly as a file
works for the text and figures, but browsers may block the fonts that MathJax loads.
EOF
