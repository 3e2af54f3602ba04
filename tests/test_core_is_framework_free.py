"""DESIGN.md rule 1: diptych/core and diptych/recurrent never import a framework."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import diptych

FRAMEWORKS = {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "triton"}
ROOT = Path(diptych.__file__).parent
NEUTRAL = [ROOT / "core", ROOT / "recurrent"]


def _neutral_files() -> list[Path]:
    return sorted(p for d in NEUTRAL for p in d.rglob("*.py"))


def test_no_framework_import_in_neutral_source():
    offenders = []
    for path in _neutral_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}"
                          for n in names if n.split(".")[0] in FRAMEWORKS]
    assert not offenders, "\n".join(offenders)


def test_neutral_modules_import_with_frameworks_blocked():
    modules = []
    for base in ("diptych.core", "diptych.recurrent"):
        pkg = __import__(base, fromlist=["_"])
        modules.append(base)
        modules += [m.name for m in pkgutil.walk_packages(pkg.__path__, base + ".")]
    script = f"""
import sys, importlib
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(FRAMEWORKS)!r}:
            raise ImportError("blocked framework import: " + name)
        return None
sys.meta_path.insert(0, Block())
for m in {modules!r}:
    importlib.import_module(m)
print("ok", len({modules!r}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_the_check_itself_catches_a_framework_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom torch import nn\n")
    tree = ast.parse(bad.read_text())
    found = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module.split(".")[0] in FRAMEWORKS]
    assert found
