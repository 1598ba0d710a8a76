"""The import rule: model <- engine <- (server, llm) <- apps <- composition root and CLI.

Every module's imports (function-level ones included) are parsed, not executed. A module may
import its own package and the layers its layer allows; apps never import each other, the
server never imports an app, and apps reach models through lmstack.llm / lmstack.models only.

KNOWN would list accepted exceptions; it is empty, and a violation that appears fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lmstack

ROOT = Path(lmstack.__file__).parent

# Packages/modules by layer; a name maps to the first entry it starts with.
LAYER_OF = {
    "lmstack.errors": "base",
    "lmstack.httpapi": "base",  # OpenAI-shaped errors, JSON bodies, SSE: for every router
    "lmstack.config": "base",
    "lmstack.cpu": "base",
    "lmstack.extras": "base",  # which optional packages each app needs, checked on entry
    "lmstack.version": "base",  # __version__, for GET /version
    "lmstack.kernels": "kernels",
    "lmstack.model": "model",
    "lmstack.models": "models",
    "lmstack.embed": "models",  # the sentence embedder docqa and triage share
    "lmstack.explain": "explain",  # attention explained on the model's own internals
    "lmstack.explain_api": "explain",
    "lmstack.engine": "engine",
    "lmstack.server": "server",
    "lmstack.llm": "llm",
    "lmstack.docqa": "app",
    "lmstack.triage": "app",
    "lmstack.align": "app",
    "lmstack.bench": "root",
    "lmstack.plan": "root",
    "lmstack.plan_cli": "root",
    "lmstack.textgen": "root",
    "lmstack.cli": "root",
    "lmstack.serve": "root",  # the composition root
    "lmstack.page": "root",  # the web page over every app's routes
    "lmstack": "root",  # the package itself: the public API (LLM, SamplingParams)
}
ALLOWED = {
    "base": {"base"},
    "kernels": {"base"},
    "model": {"base", "kernels"},
    "models": {"base", "model"},
    "explain": {"base", "kernels", "model"},
    "engine": {"base", "kernels", "model"},
    "server": {"base", "kernels", "model", "engine"},
    "llm": {"base", "model", "engine"},
    "app": {"base", "llm", "models"},
    "root": {
        "base",
        "kernels",
        "model",
        "models",
        "explain",
        "engine",
        "server",
        "llm",
        "app",
        "root",
    },
}
KNOWN: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = ["lmstack", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from lmstack import llm` imports the module lmstack.llm, not the package's API
            submodules = {f"{target}.{a.name}" for a in node.names} & MODULES
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(target)
    return {f for f in found if f == "lmstack" or f.startswith("lmstack.")}


MODULES = {module_name(p) for p in ROOT.rglob("*.py")}


def layer(name: str) -> tuple[str, str]:
    """(layer, the unit it belongs to: an app's package, or the layer itself)."""
    for prefix in sorted(LAYER_OF, key=len, reverse=True):
        if name == prefix or name.startswith(prefix + "."):
            kind = LAYER_OF[prefix]
            return kind, prefix if kind == "app" else kind
    raise AssertionError(f"{name} is in no layer: add it to LAYER_OF")


def violations() -> set[tuple[str, str]]:
    found = set()
    for path in ROOT.rglob("*.py"):
        source = module_name(path)
        kind, unit = layer(source)
        for target in imports_of(path):
            if target == "lmstack" and kind != "root":
                found.add((source, target))  # the package root imports the engine
                continue
            target_kind, target_unit = layer(target)
            if target_unit == unit:
                continue
            if target_kind not in ALLOWED[kind]:
                found.add((source, target))
    return found


def test_every_module_has_a_layer():
    for name in MODULES:
        layer(name)


def test_imports_follow_the_layers():
    found = violations()
    new = sorted(found - KNOWN)
    gone = sorted(KNOWN - found)
    assert not new, "imports that break the layer rule:\n" + "\n".join(
        f"  {a} -> {b}" for a, b in new
    )
    assert not gone, "fixed, now remove from KNOWN:\n" + "\n".join(f"  {a} -> {b}" for a, b in gone)


def test_the_rule_catches_a_violation(tmp_path):
    # The checker itself must be able to fail: an engine module importing the server.
    probe = ROOT / "engine" / "_layer_probe.py"
    probe.write_text("from lmstack.server import app\n")
    try:
        assert ("lmstack.engine._layer_probe", "lmstack.server.app") in violations()
    finally:
        probe.unlink()
