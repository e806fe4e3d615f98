"""The built book, opened in a real browser, with no network.

These tests load every page of ``_build/html`` (built by ``bash scripts/build_book.sh``) in
headless Chromium, served from a local web server on 127.0.0.1, and check what a reader would
see: that the equations are typeset, the figures load, the saved widgets are drawn, no error
output or console error appears, nothing is fetched from any other host, and the navigation
(next/previous links, the table of contents, every internal link) leads to pages that exist.

Every page is opened at two viewports, a desktop window (1366×900) and a phone (390×844), and
at both the page must also show no Markdown table left as text (a paragraph of ``| a | b |``
rows), clip nothing (no table, code cell, equation, image or widget may reach past the right
edge of the text column unless a horizontally scrolling box that fits holds it), and show no
path of the machine that executed the notebooks (``/home/``, ``site-packages``, ...).  A chapter
(a notebook under ``notebooks/``) opens with a ``The data`` admonition (class ``data``) that
names the digits it uses, before its first output.  The evaluation chapter and the results page
show the leaderboard as a real table (a ``model`` column and a ``worst...`` column).  At the
desktop size, every explorer (a widget with the class ``book-explorer``: sliders over
precomputed frames) must change its picture when each slider moves, with no kernel behind the
page, and a chapter with widget outputs must have such an explorer.

``test_figures_are_legible`` checks, at the desktop size, that no figure of a cell output
(explorer frames included) is shrunk below 75 % of its natural width, where matplotlib's 10 pt
text would drop under ~10 px.  The chapters in ``FIGURES_PREDATE_STYLE`` still carry figures
drawn before the book's figure size: that test is a strict expected failure for them, so once a
re-executed chapter passes, the test fails until it is removed from the set.

Chromium is Debian's (``apt-get install chromium``), driven by the Python ``playwright``
package; ``playwright install`` is never needed.  Without either of them the tests are skipped
with the reason, unless ``ADVBOOK_REQUIRE_BROWSER=1``, which turns the skip into a failure (CI
sets it).  ``ADVBOOK_CHROMIUM`` overrides the browser's path; ``ADVBOOK_SITE`` the built site
(default ``_build/html``; a relative path is taken from the repository root), e.g. to test an
older build; ``ADVBOOK_SCREENSHOTS=DIR`` saves a full-page screenshot of every page at each
viewport into DIR (``notebooks__01_energy__phone.png``).

All tests carry the ``browser`` marker: ``pytest -m browser`` runs only these, ``-m "not browser"``
leaves them out.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (installed with jupyter-book) is needed to read _toc.yml")

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / os.environ.get("ADVBOOK_SITE", "_build/html")  # an absolute path replaces ROOT
CHROMIUM = os.environ.get("ADVBOOK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
TIMEOUT_MS = 60_000

# The two windows every page is read in: a desktop browser and a phone held upright.
VIEWPORTS = {
    "desktop": {"width": 1366, "height": 900},
    "phone": {"width": 390, "height": 844},
}

# Chapters whose committed outputs predate the book's figure size (utils/plot.py): the page shrinks
# their figures below a legible scale, and re-executing the notebook fixes them. Only
# test_figures_are_legible expects them to fail, strictly (tests/book_state.py, one list for all tests).
from book_state import FIGURES_PREDATE_STYLE, MACHINE_PATH  # noqa: E402

# A figure may be shown at no less than this fraction of its natural width: matplotlib's 10 pt
# text at 100 dpi is ~14 px high, so it stays at or above ~10 px.
MIN_FIGURE_SCALE = 0.75
# Pages that must show the leaderboard as an HTML table with a "model" and a "worst..." column.
LEADERBOARD_DOCS = {"notebooks/09_evaluation", "book/results"}
# How far (px) an element may reach past the text column before it counts as clipped.
CLIP_TOLERANCE_PX = 2

# Folders and generated pages of the built site that are not chapters of the book.
NON_BOOK_PAGES = {"index", "genindex", "search", "py-modindex"}
NON_BOOK_DIRS = {"_static", "_sources", "_images", "_sphinx_design_static"}


# --- what the book is supposed to contain ---------------------------------------------------

def _toc_docnames() -> list[str]:
    """The pages listed in _toc.yml, in reading order (root first), without suffixes."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    names = [toc["root"]]

    def walk(entries):
        for entry in entries or []:
            if "file" in entry:
                names.append(entry["file"])
            walk(entry.get("sections"))

    for part in toc.get("parts") or []:
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [re.sub(r"\.(md|ipynb)$", "", name) for name in names]


DOCS = _toc_docnames()
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))


def _source(doc: str) -> Path | None:
    for suffix in (".ipynb", ".md"):
        path = ROOT / f"{doc}{suffix}"
        if path.is_file():
            return path
    return None


def _notebook(doc: str) -> dict | None:
    path = _source(doc)
    if path is None or path.suffix != ".ipynb":
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _markdown_text(doc: str) -> str:
    path = _source(doc)
    if path is None:
        return ""
    if path.suffix == ".md":
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def _source_has_math(doc: str) -> bool:
    text = re.sub(r"```.*?```", "", _markdown_text(doc), flags=re.S)  # code blocks do not count
    text = re.sub(r"`[^`\n]*`", "", text)
    return bool(re.search(r"\$\$|\$[^$\n]+\$|\\begin\{", text))


def _widget_views(doc: str) -> tuple[int, bool]:
    """(number of widget-view outputs, whether the notebook saved the widget state)."""
    nb = _notebook(doc)
    if nb is None:
        return 0, False
    views = sum(
        1
        for cell in nb["cells"] if cell["cell_type"] == "code"
        for out in cell.get("outputs", [])
        if WIDGET_VIEW in out.get("data", {})
    )
    state = nb.get("metadata", {}).get("widgets", {}).get(WIDGET_STATE, {}).get("state")
    return views, bool(state)


# --- fixtures -------------------------------------------------------------------------------

def _unavailable(reason: str):
    if os.environ.get("ADVBOOK_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (ADVBOOK_REQUIRE_BROWSER=1 makes this a failure)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the Python package playwright is not installed (pip install playwright)")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (install it with: sudo apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def site() -> Path:
    if not (SITE / "index.html").is_file():
        pytest.fail(f"the book has not been built: {SITE}/index.html is missing. "
                    "Run `bash scripts/build_book.sh` first.")
    return SITE


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002  (the signature is http.server's)
        pass


@pytest.fixture(scope="session")
def base_url(site):
    """The built site, served on 127.0.0.1 at a free port for the whole session."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="book-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@dataclass
class Watch:
    """Everything that went wrong while a page was open."""

    external: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    bad_status: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        return ([f"request to another host: {u}" for u in self.external]
                + [f"failed request: {u}" for u in self.failed]
                + [f"HTTP error: {u}" for u in self.bad_status]
                + [f"console error: {m}" for m in self.console])


def _is_external(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in {"http", "https", "ws", "wss"} and parsed.hostname not in LOCAL_HOSTS


@contextlib.contextmanager
def watched_page(browser, viewport: str = "desktop"):
    """A fresh page, in a window of VIEWPORTS[viewport], whose requests are confined to 127.0.0.1
    and whose errors are recorded."""
    context = browser.new_context(service_workers="block", viewport=VIEWPORTS[viewport])
    watch = Watch()

    def route(r):
        if _is_external(r.request.url):
            watch.external.append(r.request.url)
            r.abort("blockedbyclient")
        else:
            r.continue_()

    context.route("**/*", route)
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    # net::ERR_ABORTED is the browser cancelling a request itself (the page navigated or was closed
    # while a font or icon was still loading, which happens on a busy machine); a file that is really
    # missing still shows, as an HTTP error from the local server.
    page.on("requestfailed", lambda req: None if _is_external(req.url) or "ERR_ABORTED" in str(req.failure)
            else watch.failed.append(f"{req.url} ({req.failure})"))
    page.on("response", lambda resp: resp.status >= 400
            and watch.bad_status.append(f"{resp.status} {resp.url}"))
    page.on("console", lambda msg: msg.type == "error"
            and watch.console.append(f"{msg.text} [{msg.location.get('url', '')}]"))
    page.on("pageerror", lambda exc: watch.console.append(f"uncaught exception: {exc}"))
    try:
        yield page, watch
    finally:
        context.close()


def _page_path(url: str) -> str:
    """'http://127.0.0.1:PORT/book/intro.html#x' -> 'book/intro'."""
    path = unquote(urlparse(url).path).lstrip("/")
    return re.sub(r"\.html$", "", path)


# --- checks run inside the page -------------------------------------------------------------

WAIT_FOR_MATHJAX = """() => window.MathJax && window.MathJax.startup && window.MathJax.startup.promise"""

MATH_STATE = r"""async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const math = Array.from(document.querySelectorAll('.math'));
  const bare = math.filter(el => !el.querySelector('mjx-container')).map(el => el.textContent.slice(0, 80));
  const main = (document.querySelector('main') || document.body).cloneNode(true);
  main.querySelectorAll('pre, code, script, style, textarea, mjx-container, .highlight, .cell_input')
      .forEach(el => el.remove());
  return {
    mathElements: math.length,
    containers: document.querySelectorAll('mjx-container').length,
    bare: bare,
    text: main.textContent,
  };
}"""

IMAGES = """async () => {
  const imgs = Array.from(document.images);
  imgs.forEach(img => { img.loading = 'eager'; });
  const settle = img => img.complete ? Promise.resolve() : new Promise(done => {
    img.addEventListener('load', done, {once: true});
    img.addEventListener('error', done, {once: true});
  });
  const timeout = new Promise(done => setTimeout(done, 20000));
  await Promise.race([Promise.all(imgs.map(settle)), timeout]);
  return imgs.map(img => ({src: img.currentSrc || img.getAttribute('src'), width: img.naturalWidth}));
}"""

WIDGETS_DRAWN = """() => {
  const views = Array.from(document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'));
  return views.length > 0 && views.every(v => {
    const area = v.previousElementSibling;
    return area && area.classList.contains('widget-subarea') && area.querySelector('.jupyter-widgets, .widget-inline-hbox, .lm-Widget') !== null;
  });
}"""

WIDGET_REPORT = """() => Array.from(document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]'))
  .map(v => ({model: JSON.parse(v.textContent).model_id,
              drawn: !!(v.previousElementSibling && v.previousElementSibling.classList.contains('widget-subarea')
                        && v.previousElementSibling.children.length > 0)}))"""

LINKS = """() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"""

# The text column: the article of the page.  The snippets below look only inside it (with the
# same selector, falling back to <main>).
ARTICLE = "article.bd-article"

# Paragraphs and list items whose text (code and equations left out) holds a Markdown table row
# or separator: a table that was printed as Markdown but rendered as text.  Only the innermost
# such element counts (an <li> holding a matching <p> is one table, not two).
MARKDOWN_TABLES = r"""() => {
  const col = document.querySelector('article.bd-article') || document.querySelector('main');
  const separator = /\|\s*:?-{3,}:?\s*\|/;
  const isRow = line => {
    const s = line.trim();
    return s.length > 2 && s.startsWith('|') && s.endsWith('|') && (s.slice(1, -1).match(/\|/g) || []).length >= 2;
  };
  const hits = [];
  for (const el of col.querySelectorAll('p, li')) {
    if (!el.textContent.includes('|')) continue;
    const copy = el.cloneNode(true);
    copy.querySelectorAll('code, kbd, pre, mjx-container, .math, script, style').forEach(x => x.remove());
    const text = copy.textContent;
    if (separator.test(text) || text.split('\n').some(isRow)) hits.push(el);
  }
  const innermost = hits.filter(el => !hits.some(other => other !== el && el.contains(other)));
  return innermost.map(el => el.textContent.trim().replace(/\s+/g, ' ').slice(0, 120));
}"""

# Visible elements of the text column that reach past its right edge (its content box, and never
# past the window) by more than `tolerance` px, unless a horizontally scrolling box (overflow-x
# auto or scroll) between them and the column holds them and itself fits.  Only the outermost
# offender of a subtree is reported.  Hidden elements (display:none, visibility:hidden, opacity 0,
# collapsed toggles, closed <details>) and MathJax's screen-reader copy do not count.
CLIPPED = r"""(tolerance) => {
  const col = document.querySelector('article.bd-article') || document.querySelector('main');
  const style = getComputedStyle(col);
  const box = col.getBoundingClientRect();
  const right = Math.min(box.right - parseFloat(style.paddingRight || '0'), document.documentElement.clientWidth);
  const scrolls = el => /^(auto|scroll)$/.test(getComputedStyle(el).overflowX);
  const visible = el => typeof el.checkVisibility !== 'function'
      || el.checkVisibility({opacityProperty: true, visibilityProperty: true});
  const offenders = new Set();
  const report = [];
  for (const el of col.querySelectorAll('*')) {
    const r = el.getBoundingClientRect();
    if (r.width < 2 || r.height < 2 || r.right <= right + tolerance) continue;
    if (el.closest('mjx-assistive-mml, script, style, template, noscript')) continue;
    if (!visible(el)) continue;
    let held = false, inside = false;
    for (let a = el.parentElement; a && a !== col; a = a.parentElement) {
      if (offenders.has(a)) { inside = true; break; }
      if (scrolls(a) && a.getBoundingClientRect().right <= right + tolerance) { held = true; break; }
    }
    if (held || inside) continue;
    offenders.add(el);
    const cls = typeof el.className === 'string' ? el.className.trim().split(/\s+/).slice(0, 3).join('.') : '';
    const section = el.closest('section[id]');
    report.push({
      what: el.tagName.toLowerCase() + (cls ? '.' + cls : ''),
      width: Math.round(r.width),
      scrollWidth: el.scrollWidth,
      past: Math.round(r.right - right),
      column: Math.round(right - Math.max(box.left + parseFloat(style.paddingLeft || '0'), 0)),
      section: section ? section.id : '',
      text: (el.getAttribute('src') || el.textContent || '').trim().replace(/\s+/g, ' ').slice(0, 60),
    });
  }
  return report;
}"""

# The figures of cell outputs (explorer frames included) and those pasted from a notebook
# (glue puts a bare <img> of _images/ on the page) as they are shown: natural and displayed
# width.  Images that are not displayed (in a collapsed toggle) have no scale.
FIGURES = r"""() => {
  const col = document.querySelector('article.bd-article') || document.querySelector('main');
  return Array.from(col.querySelectorAll('.cell_output img, .output img, img[src*="_images/"]'))
    .filter(img => img.naturalWidth > 0 && img.clientWidth > 0)
    .map(img => ({src: (img.getAttribute('src') || '').slice(0, 100), natural: img.naturalWidth,
                  shown: img.clientWidth, scale: img.clientWidth / img.naturalWidth}));
}"""

# The "The data" admonitions of the page (class "data"), their text, and whether each comes
# before the first code-cell output.
DATA_NOTES = r"""() => {
  const col = document.querySelector('article.bd-article') || document.querySelector('main');
  const output = col.querySelector('.cell_output');
  return Array.from(col.querySelectorAll('div.admonition.data')).map(el => ({
    text: el.innerText,
    beforeOutputs: !output || Boolean(el.compareDocumentPosition(output) & Node.DOCUMENT_POSITION_FOLLOWING),
  }));
}"""

# The header cells of every table of the article (the <thead>, else the first row).
TABLE_HEADERS = r"""() => {
  const col = document.querySelector('article.bd-article') || document.querySelector('main');
  return Array.from(col.querySelectorAll('table')).map(table => {
    let cells = Array.from(table.querySelectorAll('thead th, thead td'));
    if (!cells.length) {
      const row = table.querySelector('tr');
      cells = row ? Array.from(row.children) : [];
    }
    return cells.map(c => c.innerText.trim());
  });
}"""

# The frames an explorer shows now: the src of each of its images that is displayed.
EXPLORER_FRAMES = """(box) => Array.from(box.querySelectorAll('img'))
  .filter(img => img.offsetParent !== null && img.getBoundingClientRect().width > 0)
  .map(img => img.src)"""

# True once the explorer shows other frames than `before`.
EXPLORER_CHANGED = """([box, before]) => {
  const now = Array.from(box.querySelectorAll('img'))
    .filter(img => img.offsetParent !== null && img.getBoundingClientRect().width > 0).map(img => img.src);
  return now.length > 0 && JSON.stringify(now) !== JSON.stringify(before);
}"""

# TeX that MathJax should have replaced: display/inline delimiters, environments, and $...$
# spans that contain TeX syntax (a backslash, ^ or _).
RAW_TEX = re.compile(r"\$\$|\\\(|\\\)|\\\[|\\\]|\\begin\{|\$[^$\n]*[\\^_][^$\n]*\$")


def _local_target(url: str, base_url: str) -> tuple[Path, str] | None:
    """The file a local link points to, and its fragment; None for links elsewhere."""
    if not url.startswith(base_url):
        return None
    parsed = urlparse(url)
    rel = unquote(parsed.path).lstrip("/")
    if rel == "" or rel.endswith("/"):
        rel += "index.html"
    return SITE / rel, parsed.fragment


@functools.lru_cache(maxsize=None)
def _ids_in(path: Path) -> frozenset[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(re.findall(r'\b(?:id|name)="([^"]+)"', text))


# The figures each page showed at the desktop size, measured by test_page_renders_offline so
# that test_figures_are_legible need not open the page again (it does when run on its own).
_FIGURES_SEEN: dict[str, list[dict]] = {}


def _is_chapter(doc: str) -> bool:
    """A chapter of the book: a notebook under notebooks/."""
    return doc.startswith("notebooks/") and _notebook(doc) is not None


def _article_text(page) -> str:
    selector = ARTICLE if page.locator(ARTICLE).count() else "main"
    return page.inner_text(selector)


def _reading_problems(page, doc: str) -> list[str]:
    """What a reader of this page at this window size would trip over: Markdown tables left as
    text, clipped content, a missing data note, machine paths, a leaderboard that is no table."""
    problems = []
    tables = page.evaluate(MARKDOWN_TABLES)
    if tables:
        problems.append(f"{len(tables)} Markdown table(s) shown as text instead of a table, "
                        f"first: {tables[0]!r}")

    clipped = page.evaluate(CLIPPED, CLIP_TOLERANCE_PX)
    if clipped:
        shown = "; ".join(
            f"<{c['what']}> {c['width']} px wide (scrollWidth {c['scrollWidth']}), {c['past']} px past "
            f"the {c['column']} px column, in #{c['section']}: {c['text']!r}" for c in clipped[:4])
        problems.append(f"{len(clipped)} element(s) reach past the text column and are cut off: {shown}")

    text = _article_text(page)
    paths = sorted({m.group(0) for m in MACHINE_PATH.finditer(text)})
    if paths:
        at = MACHINE_PATH.search(text).start()
        problems.append(f"machine-specific path(s) {paths} in the page text, first in "
                        f"{text[max(0, at - 60):at + 60]!r}")

    if _is_chapter(doc):
        notes = page.evaluate(DATA_NOTES)
        good = [n for n in notes if n["beforeOutputs"] and re.search(r"digits", n["text"], re.I)]
        if not good:
            found = [f"{n['text'][:60]!r} (before the outputs: {n['beforeOutputs']})" for n in notes]
            problems.append("no 'The data' admonition (div.admonition.data) that mentions the digits "
                            f"before the first output; found {found or 'none'}")

    if doc in LEADERBOARD_DOCS:
        headers = page.evaluate(TABLE_HEADERS)
        if not any(any(re.search(r"\bmodel\b", h, re.I) for h in row)
                   and any(re.search(r"worst", h, re.I) for h in row) for row in headers):
            problems.append("no leaderboard table (an HTML <table> with a 'model' and a 'worst...' "
                            f"header); the tables' headers are {headers}")
    return problems


def _explorer_problems(page, doc: str) -> list[str]:
    """Every explorer (.book-explorer) shows a frame and shows another one when any of its
    sliders (or drop-downs with a choice) moves, with no kernel; a chapter with widget outputs
    has at least one explorer with a visible frame."""
    problems = []
    boxes = page.locator(".book-explorer")
    with_frames = 0
    for i in range(boxes.count()):
        box = boxes.nth(i).element_handle()
        frames = box.evaluate(EXPLORER_FRAMES)
        if not frames:
            problems.append(f"explorer {i + 1} shows no frame (no visible image)")
            continue
        with_frames += 1
        controls = box.query_selector_all(".noUi-handle, select")
        if not controls:
            problems.append(f"explorer {i + 1} has no slider or drop-down")
        for control in controls:
            label = control.evaluate("c => (c.closest('.widget-inline-hbox')?.querySelector('.widget-label')"
                                     "?.textContent || '').trim()")
            before = box.evaluate(EXPLORER_FRAMES)
            if control.evaluate("c => c.tagName") == "SELECT":
                options = control.evaluate("s => Array.from(s.options).map(o => o.value)")
                if len(options) < 2:
                    continue  # one value: nothing to choose
                current = control.evaluate("s => s.selectedIndex")
                control.select_option(index=(current + 1) % len(options))
                moved = f"drop-down {label!r} set to option {(current + 1) % len(options) + 1}"
            else:
                now, last = (control.get_attribute(a) for a in ("aria-valuenow", "aria-valuemax"))
                at_end = now is not None and last is not None and float(now) >= float(last)
                key = "ArrowLeft" if at_end else "ArrowRight"
                control.focus()
                page.keyboard.press(key)
                moved = f"slider {label!r} moved by {key} from {now}"
            try:
                page.wait_for_function(EXPLORER_CHANGED, arg=[box, before], timeout=5_000)
            except Exception:
                problems.append(f"explorer {i + 1}: {moved}, but its picture did not change within 5 s")
    views, _ = _widget_views(doc)
    if views and not with_frames:
        problems.append(f"the notebook has {views} widget output(s) but no explorer (.book-explorer) "
                        "with a visible frame: its widgets need a kernel, so their figure is frozen")
    return problems


def _save_screenshot(page, doc: str, viewport: str) -> None:
    if os.environ.get("ADVBOOK_SCREENSHOTS"):
        shots = Path(os.environ["ADVBOOK_SCREENSHOTS"])
        shots.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shots / f"{doc.replace('/', '__')}__{viewport}.png"), full_page=True)


# --- the tests ------------------------------------------------------------------------------

def test_site_holds_exactly_the_toc_pages(site):
    """Every page of _toc.yml was built, and nothing else was (only_build_toc_files)."""
    built = set()
    for path in site.rglob("*.html"):
        rel = path.relative_to(site)
        if rel.parts[0] in NON_BOOK_DIRS or rel.with_suffix("").as_posix() in NON_BOOK_PAGES:
            continue
        built.add(rel.with_suffix("").as_posix())
    missing = [doc for doc in DOCS if doc not in built]
    assert not missing, f"pages in _toc.yml that were not built: {missing}"
    assert built == set(DOCS), f"pages built that are not in _toc.yml: {sorted(built - set(DOCS))}"


@pytest.mark.parametrize("doc", DOCS)
@pytest.mark.parametrize("viewport", list(VIEWPORTS))
def test_page_renders_offline(browser, base_url, viewport, doc):
    html = SITE / f"{doc}.html"
    assert html.is_file(), f"{doc} is listed in _toc.yml but {html} was not built"
    problems: list[str] = []
    with watched_page(browser, viewport) as (page, watch):
        response = page.goto(base_url + f"{doc}.html", wait_until="load")
        assert response is not None and response.status == 200, f"{doc}.html: HTTP {response and response.status}"
        page.wait_for_load_state("networkidle")

        # Equations: MathJax loaded from the site and replaced every piece of TeX.
        if page.locator("script[src*='mathjax']").count():
            try:
                page.wait_for_function(WAIT_FOR_MATHJAX, timeout=20_000)
            except Exception as exc:  # a timeout: MathJax never started
                problems.append(f"MathJax did not start within 20 s ({type(exc).__name__})")
        math = page.evaluate(MATH_STATE)
        if _source_has_math(doc) and math["containers"] == 0:
            problems.append("the source has math but the page has no typeset equations (no mjx-container)")
        if math["bare"]:
            problems.append(f"{len(math['bare'])} of {math['mathElements']} equations were not typeset, "
                            f"e.g. {math['bare'][0]!r}")
        raw = sorted(set(RAW_TEX.findall(math["text"])))
        if raw:
            problems.append(f"raw TeX left in the page text: {raw[:5]}")

        # Figures and other images.
        for img in page.evaluate(IMAGES):
            if not img["width"]:
                problems.append(f"image did not load: {img['src']}")

        # Error output of any kind.
        body = page.inner_text("body")
        if "Traceback" in body:
            problems.append("the page shows a Traceback")
        n_errors = page.locator(".output.traceback, .output.error, .cell_output .traceback").count()
        if n_errors:
            problems.append(f"the page shows {n_errors} error output(s)")

        # Widgets: when the notebook has widget outputs, the widget manager drew each of them.
        views, saved_state = _widget_views(doc)
        if views:
            if not saved_state:
                problems.append(f"the notebook has {views} widget output(s) but no saved widget state "
                                "(execute it with store_widget_state=True)")
            else:
                try:
                    page.wait_for_function(WIDGETS_DRAWN, timeout=30_000)
                except Exception:  # report which views stayed empty
                    report = page.evaluate(WIDGET_REPORT)
                    problems.append(f"widgets not drawn: {[w['model'] for w in report if not w['drawn']]}")
                shown = page.locator("script[type='application/vnd.jupyter.widget-view+json']").count()
                if shown != views:
                    problems.append(f"the notebook has {views} widget outputs, the page {shown}")
            page.wait_for_load_state("networkidle")

        # Links: every link into the site reaches an existing file (and anchor).
        for url in sorted(set(page.evaluate(LINKS))):
            target = _local_target(url, base_url)
            if target is None:
                continue
            path, fragment = target
            if not path.is_file():
                problems.append(f"dead link: {url}")
            elif fragment and path.suffix == ".html" and fragment not in _ids_in(path):
                problems.append(f"link to a missing anchor: {url}")

        # The Colab button of a chapter opens this very notebook from the repository.
        if _notebook(doc) is not None:
            repo = CONFIG["repository"]["url"].rstrip("/").removeprefix("https://github.com/")
            prefix = CONFIG["repository"].get("path_to_book", "").strip("/")
            nb_path = f"{prefix}/{doc}.ipynb" if prefix else f"{doc}.ipynb"
            colab = (f"https://colab.research.google.com/github/{repo}/blob/"
                     f"{CONFIG['repository']['branch']}/{nb_path}")
            links = page.evaluate(LINKS)
            if colab not in links:
                found = [u for u in links if "colab.research.google.com" in u]
                problems.append(f"no Colab launch link {colab} (found {found})")

        # What a reader trips over at this window size (see _reading_problems), once the images
        # the widgets drew have loaded too.
        page.evaluate(IMAGES)
        problems += _reading_problems(page, doc)
        _save_screenshot(page, doc, viewport)

        # Explorers answer their sliders without a kernel (this moves them: it comes last).
        if viewport == "desktop":
            _FIGURES_SEEN[doc] = page.evaluate(FIGURES)
            problems += _explorer_problems(page, doc)

        problems += watch.problems()
    assert not problems, f"{doc}.html at the {viewport} size:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("doc", [
    pytest.param(doc, marks=pytest.mark.xfail(
        strict=True, raises=AssertionError,
        reason="its committed figures predate the book's figure size (FIGURES_PREDATE_STYLE); "
               "if this test passes, the chapter was re-executed: remove it from FIGURES_PREDATE_STYLE"))
    if doc in FIGURES_PREDATE_STYLE else doc
    for doc in DOCS
])
def test_figures_are_legible(browser, base_url, doc):
    """At the desktop size, no figure of a cell output is shown below MIN_FIGURE_SCALE of its
    natural width (the explorers' frames included)."""
    figures = _FIGURES_SEEN.get(doc)
    if figures is None:
        with watched_page(browser, "desktop") as (page, watch):
            page.goto(base_url + f"{doc}.html", wait_until="load")
            page.evaluate(IMAGES)  # every image loaded
            if _widget_views(doc)[0]:
                with contextlib.suppress(Exception):  # test_page_renders_offline reports undrawn widgets
                    page.wait_for_function(WIDGETS_DRAWN, timeout=30_000)
                page.evaluate(IMAGES)
            figures = page.evaluate(FIGURES)
    small = sorted((f for f in figures if f["scale"] < MIN_FIGURE_SCALE), key=lambda f: f["scale"])
    assert not small, (
        f"{doc}.html: {len(small)} of {len(figures)} figure(s) are shown below {MIN_FIGURE_SCALE:.0%} of "
        f"their natural width, so their text is too small to read; the worst, {small[0]['src']!r}, is "
        f"{small[0]['natural']} px wide, shown at {small[0]['shown']} px ({small[0]['scale']:.2f}). "
        "Draw it at the book's figure size (re-execute the notebook).")


def test_next_and_previous_links_walk_the_book_in_order(browser, base_url):
    """From the front page, "next" visits every page of the toc in order, "previous" returns."""
    with watched_page(browser) as (page, watch):
        page.goto(base_url)  # index.html redirects to the root page
        page.wait_for_url(re.compile(re.escape(DOCS[0]) + r"\.html"))
        forward = [_page_path(page.url)]
        while page.locator("a.right-next").count() and len(forward) <= len(DOCS):
            with page.expect_navigation(wait_until="load"):
                page.locator("a.right-next").first.click()
            forward.append(_page_path(page.url))
        assert forward == DOCS, f"'next' visits {forward}, the toc lists {DOCS}"

        backward = [_page_path(page.url)]
        while page.locator("a.left-prev").count() and len(backward) <= len(DOCS):
            with page.expect_navigation(wait_until="load"):
                page.locator("a.left-prev").first.click()
            backward.append(_page_path(page.url))
        assert backward == DOCS[::-1], f"'previous' visits {backward}, expected {DOCS[::-1]}"
        assert not watch.problems(), "\n".join(watch.problems())


def test_sidebar_lists_every_page_and_each_link_loads(browser, base_url):
    """The left table of contents links every toc page, and each link answers HTTP 200."""
    with watched_page(browser) as (page, watch):
        page.goto(base_url + f"{DOCS[0]}.html", wait_until="load")
        nav = page.eval_on_selector_all("nav.bd-docs-nav a[href]", "els => els.map(e => e.href)")
        brand = page.eval_on_selector_all("a.navbar-brand[href]", "els => els.map(e => e.href)")
        assert nav, "the page has no left table of contents (nav.bd-docs-nav)"
        listed = set()
        for url in nav + brand:
            response = page.request.get(url)
            assert response.status == 200, f"table-of-contents link {url} answers HTTP {response.status}"
            doc = _page_path(url.split("#")[0])
            listed.add(DOCS[0] if doc in ("", "index") else doc)
        missing = [doc for doc in DOCS if doc not in listed]
        assert not missing, f"pages missing from the left table of contents: {missing}"
        assert not watch.problems(), "\n".join(watch.problems())
