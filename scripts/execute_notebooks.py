"""Execute the book's notebooks top to bottom and write their outputs back in place.

Usage (normally through the wrapper, which prepares the environment first)::

    bash scripts/execute_notebooks.sh [--profile full|fast] [NOTEBOOK ...]
    python scripts/execute_notebooks.py [--profile full|fast] [--timeout SECONDS] [NOTEBOOK ...]

Without NOTEBOOK arguments every ``notebooks/*.ipynb`` is executed, in name order (chapter order).
Each notebook runs in a fresh ``python3`` kernel whose working directory is the notebook's own
folder, with ``ADVBOOK_PROFILE`` set to the chosen profile (default ``full``: the profile of the
committed outputs). Widget state is stored in the notebook, so the explorers render in the HTML
book.

A notebook is written back only when every cell ran without an error; otherwise the file is left
exactly as it was, the failing cell is reported, and the script exits with status 1 after trying
the remaining notebooks. Before writing, volatile metadata is removed (per-cell execution
timestamps and similar) and execution counts are renumbered 1..n in cell order, so that
re-executing an unchanged notebook changes as little as possible.

The package a page was made with is recorded: the notebook's metadata gets ``advbook.commit`` (the
commit checked out while it ran), ``advbook.profile`` and the measured run (wall time, CPU cores,
threads, GPU, the models the run had to train, whether other work shared the machine), the chapter's
header gets a line that states that measurement (:func:`runtime_text`), and the Colab install cell (the first code
cell, starting ``# Colab only``) is rewritten to install exactly that commit from the repository
named in ``_config.yml`` (``repository.url``, the one place the address is written). So that the
commit really holds the code that ran, the script refuses to run while ``utils/`` or
``pyproject.toml`` has uncommitted changes.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PROFILES = ("full", "fast")

#: Cell metadata keys that change on every run and carry nothing a reader needs.
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime", "papermill")
#: Terminal colour codes in tracebacks (stripped from what the script prints).
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
#: Notebook metadata keys of the same kind.
VOLATILE_NOTEBOOK_METADATA = ("papermill", "toc-autonumbering", "varInspector")


#: The first line of the Colab install cell; the rest of the cell is written by :func:`pin_install_cell`.
INSTALL_MARK = "# Colab only"
#: The package spec the install cell installs: the repository at one commit.
PINNED = re.compile(r'"git\+(https://github\.com/[\w.-]+/[\w.-]+?)(?:\.git)?(@[0-9a-f]{40})?"')


def repository_url(config: Path = ROOT / "_config.yml") -> str:
    """``repository.url`` of ``_config.yml``, without a trailing slash or ``.git``."""
    import yaml

    url = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("repository", {}).get("url", "")
    url = str(url).rstrip("/").removesuffix(".git")
    if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url):
        raise SystemExit(f"error: repository.url in {config.name} is not a GitHub repository address: {url!r}")
    return url


def head_commit() -> str:
    """The checked-out commit; refuses when the package's code differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True).stdout

    dirty = git("status", "--porcelain", "--", "utils", "pyproject.toml").strip()
    if dirty:
        raise SystemExit("error: utils/ or pyproject.toml has uncommitted changes; commit them first, so that the "
                         "commit recorded in the notebooks holds the code that produced them:\n" + dirty)
    return git("rev-parse", "HEAD").strip()


def pin_install_cell(nb: nbformat.NotebookNode, url: str, commit: str) -> bool:
    """Point the Colab install cell at ``url@commit``; True when the notebook has such a cell."""
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source.lstrip().startswith(INSTALL_MARK):
            if not PINNED.search(cell.source):
                raise SystemExit("error: the install cell names no git+https://github.com/OWNER/REPO package")
            cell.source = PINNED.sub(f'"git+{url}@{commit}"', cell.source)
            first, _, rest = cell.source.partition("\n")
            cell.source = (f"{INSTALL_MARK}: install the book's package `utils` at the commit that produced "
                           f"this page (elsewhere this cell does nothing).\n" + rest
                           if "package `utils`" in first and "reference attack library" not in first else cell.source)
            return True
    return False


#: The header line that states how long the page took to execute; :func:`stamp_runtime` writes it.
RUNTIME_LINE = re.compile(r"^\*Measured when this page was built:[^\n]*\*$", re.M)


def runtime_text(run: dict) -> str:
    """The header line for a run recorded as ``nb.metadata.advbook``: wall time, profile, the
    machine (CPU cores, threads, GPU), which models had to be trained, and whether other work
    shared the machine."""
    minutes = run["seconds"] / 60
    took = f"{minutes:.1f} min" if minutes >= 1 else f"{run['seconds']:.0f} s"
    machine = f"{run['cpus']} CPU core{'s' if run['cpus'] != 1 else ''}"
    if run.get("gpu"):
        machine += f" and a GPU ({run['gpu']})"
    else:
        machine += f", {run['threads']} PyTorch thread{'s' if run['threads'] != 1 else ''}, no GPU"
    trained = run.get("trained") or []
    models = ("with every model it needs already cached" if not trained else
              "including the training of " + ", ".join(f"`{n}`" for n in trained))
    shared = "; other jobs shared the machine, so a quiet one is faster" if run.get("shared") else ""
    return (f"*Measured when this page was built: {took} of wall time on {machine}, "
            f"{run['profile']} profile, {models}{shared}.*")


def stamp_runtime(nb: nbformat.NotebookNode, text: str) -> None:
    """Put ``text`` (a :func:`runtime_text` line) into the first Markdown cell: in place of the
    line it wrote before, or right after the title."""
    cell = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if cell is None:
        raise SystemExit("error: the notebook has no Markdown cell to state its runtime in")
    if RUNTIME_LINE.search(cell.source):
        cell.source = RUNTIME_LINE.sub(lambda _: text, cell.source, count=1)
        return
    title, _, rest = cell.source.partition("\n")
    if not title.startswith("# "):
        raise SystemExit("error: the first Markdown cell does not start with the chapter's title")
    cell.source = f"{title}\n\n{text}\n" + (f"\n{rest.lstrip(chr(10))}" if rest.strip() else "")


def cached_models() -> set[str]:
    """The names of the trained models in the model cache (``<name>-<key>.pt``)."""
    root = Path(os.environ.get("ADVBOOK_CACHE") or Path.home() / ".cache" / "advbook") / "models"
    return {p.name for p in root.glob("*.pt")} if root.is_dir() else set()


def trained_by(nb: nbformat.NotebookNode, new_models: set[str]) -> list[str]:
    """The names of the models in ``new_models`` (cache files ``<name>-<key>.pt`` that appeared while
    ``nb`` ran) that the notebook itself trained: those whose name its code or its outputs mention.
    The cache is shared, so a model written meanwhile by another process (another chapter, a benchmark)
    is not this notebook's work and must not be credited to its run time. The header line of an earlier
    run (:data:`RUNTIME_LINE`) does not count as a mention."""
    text = []
    for cell in nb.cells:
        text.append(RUNTIME_LINE.sub("", cell.source))
        for out in cell.get("outputs", []):
            text.append(str(out.get("text", "")))
            text.extend(str(v) for k, v in out.get("data", {}).items() if k.startswith("text/"))
    blob = "\n".join(text)
    names = {name.rsplit("-", 1)[0] for name in new_models}
    return sorted(n for n in names if re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", blob))


def machine() -> dict:
    """CPU cores, the PyTorch threads a kernel will use, and the GPU if there is one."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    threads = int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads())
    return {"cpus": os.cpu_count() or 1, "threads": threads, "gpu": gpu}


def clean(nb: nbformat.NotebookNode) -> None:
    """Drop volatile metadata and renumber execution counts 1..n over the code cells that ran."""
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    count = 0
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is None:  # an empty cell: the kernel never ran it
            cell.outputs = [o for o in cell.outputs if o.get("output_type") != "execute_result"]
            continue
        count += 1
        cell.execution_count = count
        for output in cell.outputs:
            if output.get("output_type") == "execute_result":
                output.execution_count = count


def write_atomically(nb: nbformat.NotebookNode, path: Path) -> None:
    """Validate and write ``nb`` to ``path`` through a temporary file in the same folder."""
    nbformat.validate(nb)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            nbformat.write(nb, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def failing_cell(nb: nbformat.NotebookNode) -> str:
    """A short description of the first cell whose outputs hold an error (after a failed run)."""
    code_index = 0
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        code_index += 1
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
                return (f"cell {index} (code cell {code_index}) raised {output.get('ename')}: "
                        f"{output.get('evalue')}\n    first line of the cell: {first_line}")
    return "no cell holds an error output"


def shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it."""
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def execute(path: Path, timeout: int, kernel: str, pin: tuple[str, str, str]) -> tuple[bool, float]:
    """Execute one notebook; write it back if every cell succeeded. Returns (ok, seconds).
    ``pin`` is (repository url, commit, profile), recorded in the notebook."""
    nb = nbformat.read(path, as_version=4)
    url, commit, profile = pin
    pin_install_cell(nb, url, commit)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=kernel,
        resources={"metadata": {"path": str(path.parent)}},
        allow_errors=False,
        store_widget_state=True,
        record_timing=False,
    )
    before = cached_models()
    start = time.perf_counter()
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
        seconds = time.perf_counter() - start
        print(f"FAILED {shown(path)} after {seconds:.1f} s ({type(exc).__name__}); "
              "the file was not changed", flush=True)
        print("    " + failing_cell(nb), flush=True)
        detail = ANSI_ESCAPE.sub("", str(exc)).strip().splitlines()
        if detail:
            print("    " + "\n    ".join(detail[-15:]), flush=True)
        return False, seconds
    seconds = time.perf_counter() - start
    box = machine()
    run = {"commit": commit, "profile": profile, "seconds": round(seconds, 1), **box,
           "trained": trained_by(nb, cached_models() - before),
           # the 5-minute load average beyond the kernel's own threads: other work was running
           "shared": os.getloadavg()[1] > box["threads"] + 0.75}
    nb.metadata["advbook"] = run
    stamp_runtime(nb, runtime_text(run))
    clean(nb)
    write_atomically(nb, path)
    print(f"ok     {shown(path)} in {seconds:.1f} s", flush=True)
    return True, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to execute (default: every notebooks/*.ipynb, in name order)")
    parser.add_argument("--profile", choices=PROFILES, default="full",
                        help="the ADVBOOK_PROFILE the notebooks run under (default: full)")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="seconds one cell may run before it counts as failed (default: 3600)")
    parser.add_argument("--kernel", default="python3", help="the Jupyter kernel to use (default: python3)")
    args = parser.parse_args(argv)

    paths = [p.resolve() for p in args.notebooks] or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [str(p) for p in paths if not p.is_file() or p.suffix != ".ipynb"]
    if missing:
        print("error: not a notebook file: " + ", ".join(missing), file=sys.stderr)
        return 2
    if not paths:
        print(f"error: no notebooks found in {NOTEBOOKS}", file=sys.stderr)
        return 2

    pin = (repository_url(), head_commit(), args.profile)
    os.environ["ADVBOOK_PROFILE"] = args.profile  # inherited by every kernel started below
    print(f"executing {len(paths)} notebook(s) in the {args.profile!r} profile "
          f"(cache: {os.environ.get('ADVBOOK_CACHE') or '~/.cache/advbook'})", flush=True)
    results = []
    for path in paths:
        ok, seconds = execute(path, args.timeout, args.kernel, pin)
        results.append((path, ok, seconds))

    print("\nsummary (wall time per notebook):")
    for path, ok, seconds in results:
        print(f"  {'ok    ' if ok else 'FAILED'} {seconds:8.1f} s  {shown(path)}")
    print(f"  total  {sum(s for _, _, s in results):8.1f} s")
    failed = [p for p, ok, _ in results if not ok]
    if failed:
        print(f"{len(failed)} notebook(s) failed and were left unchanged", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
