"""The built book, opened in a real browser, with no network.

These tests load every page of ``_build/html`` (built by ``bash scripts/build_book.sh``) in
headless Chromium, served from a local web server on 127.0.0.1, and check what a reader would
see: that the equations are typeset, the figures load, the saved widgets are drawn, no error
output or console error appears, nothing is fetched from any other host, and the navigation
(next/previous links, the table of contents, every internal link) leads to pages that exist.

Chromium is Debian's (``apt-get install chromium``), driven by the Python ``playwright``
package; ``playwright install`` is never needed.  Without either of them the tests are skipped
with the reason, unless ``ADVBOOK_REQUIRE_BROWSER=1``, which turns the skip into a failure (CI
sets it).  ``ADVBOOK_CHROMIUM`` overrides the browser's path; ``ADVBOOK_SCREENSHOTS=DIR`` saves
a full-page screenshot of every page into DIR.

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
SITE = ROOT / "_build" / "html"
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
def watched_page(browser):
    """A fresh page whose requests are confined to 127.0.0.1 and whose errors are recorded."""
    context = browser.new_context(service_workers="block", viewport={"width": 1280, "height": 900})
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
    page.on("requestfailed", lambda req: None if _is_external(req.url)
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
def test_page_renders_offline(browser, base_url, doc):
    html = SITE / f"{doc}.html"
    assert html.is_file(), f"{doc} is listed in _toc.yml but {html} was not built"
    problems: list[str] = []
    with watched_page(browser) as (page, watch):
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

        if os.environ.get("ADVBOOK_SCREENSHOTS"):
            shots = Path(os.environ["ADVBOOK_SCREENSHOTS"])
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / (doc.replace("/", "__") + ".png")), full_page=True)

        problems += watch.problems()
    assert not problems, f"{doc}.html:\n  " + "\n  ".join(problems)


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
