"""The library's layers point down only: io -> data -> models -> engine -> commands.

Each module of `lungnlb` belongs to one layer (`LAYERS`); it may import from its own layer and the
layers below, never above, and no two packages import each other (directly or in a loop).
Benchmarks, experiments, the app and the tests sit above the library and are not imported by it.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lungnlb"
LAYERS = {  # module or package under lungnlb -> layer (lower imports nothing higher)
    "__init__": 0, "stamp": 0, "overlap": 0, "io": 0,
    "data": 1, "labels": 1, "prepare": 1,
    "blocks": 2, "networks": 2, "runtime": 2, "slice_probe": 2,
    "checkpoint": 3, "inference": 3, "training": 3, "evaluation": 3, "export": 3, "explain": 3, "visualize": 3,
    "commands": 4, "cli": 4,
}


def _unit(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path) -> set[str]:
    """The top-level modules of lungnlb (and the foreign roots) that ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within the same package
                base = path.parent.relative_to(PACKAGE).parts[: max(0, len(path.parent.relative_to(PACKAGE).parts) - node.level + 1)]
                found.add(base[0] if base else (node.module or "").split(".")[0])
            elif node.module:
                parts = node.module.split(".")
                found.add(parts[1] if parts[0] == "lungnlb" and len(parts) > 1 else "@" + parts[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                found.add(parts[1] if parts[0] == "lungnlb" and len(parts) > 1 else "@" + parts[0])
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {_unit(p) for p in MODULES} <= set(LAYERS), "add new modules of lungnlb to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    unit = _unit(path)
    upward = [name for name in _imports(path) if name in LAYERS and LAYERS[name] > LAYERS[unit]]
    foreign = [name for name in _imports(path) if name in ("@monailabel", "@tests", "@benchmarks", "@experiments", "@apps")]
    assert not upward, f"{path.name} ({unit}, layer {LAYERS[unit]}) imports the higher {upward}"
    assert not foreign, f"{path.name} imports {foreign}: the library stays below the app, tests and experiments"


def test_no_two_packages_import_each_other():
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        graph.setdefault(_unit(path), set()).update(n for n in _imports(path) if n in LAYERS and n != _unit(path))

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    loops = sorted(unit for unit in graph if reaches(unit, unit, {unit}))
    assert not loops, f"import loops through {loops}"


REPO = PACKAGE.parent
NOT_CODE = {".venv", ".git", "runs", "tests", "build", "out", "__pycache__"}  # tests may set up paths; the rest is not ours


def _edits_sys_path(tree: ast.AST) -> bool:
    """Any `sys.path.<insert|append|extend|remove>(...)`, assignment to `sys.path` or `site.addsitedir`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            target = ast.unparse(node)
            if target in ("sys.path.insert", "sys.path.append", "sys.path.extend", "sys.path.remove", "site.addsitedir"):
                return True
        if isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(ast.unparse(t).startswith("sys.path") for t in targets):
                return True
    return False


def test_the_probe_sees_a_path_edit():
    assert _edits_sys_path(ast.parse("import sys\nsys.path.insert(0, 'x')"))
    assert _edits_sys_path(ast.parse("import sys\nsys.path[:0] = ['x']"))
    assert not _edits_sys_path(ast.parse("import sys\nprint(sys.path)"))


def test_no_code_outside_tests_edits_sys_path():
    """Code is imported as installed packages, with `python -m` from the repository root, or with
    PYTHONPATH set for a new process (pytest's `pythonpath`, `monailabel start_server`); a path edit
    in code would hide a module that cannot be imported the ordinary way."""
    files = [p for p in REPO.rglob("*.py") if not NOT_CODE & set(p.relative_to(REPO).parts)]
    assert len(files) > 50, "the scan found too few files to mean anything"
    editing = [str(p.relative_to(REPO)) for p in files if _edits_sys_path(ast.parse(p.read_text(encoding="utf-8")))]
    assert not editing, f"these edit sys.path: {editing}"


# a measured time, a speed-up or a date: these belong in a result file with its date and commit
NOTEBOOK = re.compile(r"\b\d+(\.\d+)? ?(ms|s|sec|min|µs)\b|\b20\d\d-\d\d(-\d\d)?\b|\b\d+(\.\d+)? ?(x|%) (faster|slower)\b")


def _notebook_comments(text: str, python: bool) -> list[str]:
    if python:
        tokens = tokenize.generate_tokens(io.StringIO(text).readline)
        comments = [t.string for t in tokens if t.type == tokenize.COMMENT]
    else:  # shell: whole-line and trailing comments
        comments = [line[line.index("#"):] for line in text.splitlines() if line.lstrip().startswith("#") or " # " in line]
    return [c for c in comments if NOTEBOOK.search(c)]


def test_the_probe_sees_a_timing_or_a_date():
    assert _notebook_comments("x = 1  # 12.5 ms on two cores\n", True)
    assert _notebook_comments("# run of 2026-11-29\n", True)
    assert _notebook_comments("export A=1  # ~30 % faster\n", False)
    assert not _notebook_comments("timeout_s = 5.0  # the client gives up after this\n", True)


def test_no_code_comment_carries_a_timing_or_a_date():
    """Comments say why; a figure in a comment goes stale without anyone rerunning it."""
    files = [p for p in REPO.rglob("*") if p.suffix in (".py", ".sh") and p.is_file()
             and not NOT_CODE & set(p.relative_to(REPO).parts)]
    found = {str(p.relative_to(REPO)): hits for p in files
             if (hits := _notebook_comments(p.read_text(encoding="utf-8"), p.suffix == ".py"))}
    assert not found, f"timings or dates in comments: {found}"
