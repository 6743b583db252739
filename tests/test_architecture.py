"""The module layers stay one-way: no import cycle among ganpipe/ and flows/ modules, counting
imports inside functions, and no private name imported from another module."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import import_cycles  # noqa: E402 - the script lives outside any package


def test_no_import_cycles() -> None:
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_cycles.py"), str(ROOT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "0 import cycle(s)" in result.stdout


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    package = tmp_path / "ganpipe"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from ganpipe import b\n")
    (package / "b.py").write_text("def f():\n    from ganpipe.a import x\n")
    (tmp_path / "flows").mkdir()
    assert import_cycles.cycles(import_cycles.graph(tmp_path)) == [["ganpipe.a", "ganpipe.b"]]


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = []
    for path in [*(ROOT / "ganpipe").rglob("*.py"), *(ROOT / "flows").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("ganpipe", "flows")):
                offenders += [f"{path.relative_to(ROOT)}: {alias.name}" for alias in node.names
                              if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert offenders == [], offenders
