"""The house rules of the ``tierstore`` package, read from docs/code-map.md and held against the
code (issue 16 acceptance).

- Every module belongs to one *room* (a top-level module or a sub-package) of the floors table in
  docs/code-map.md, and every import between two rooms runs down: to a room on a lower floor.
  All imports count, lazy ones and ``TYPE_CHECKING`` ones included (a lazy import hides an arrow,
  it does not remove it). ``from pkg import sub`` where ``sub`` is a module is an arrow to
  ``pkg.sub`` only.
- No circle between modules, inside a room or across rooms.
- Module names are unique within the package (``__init__`` and ``__main__`` aside), so a name
  says which room you are in.
- Every module opens with a docstring that says what it owns.
- Every file and every ``file.py:Name`` the map cites exists.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tierstore"
MAP = ROOT / "docs" / "code-map.md"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The tierstore modules that ``name`` imports anywhere in its body."""
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(mod)
    out = set()
    for mod in found:
        if not mod.startswith("tierstore"):
            continue
        while mod not in MODULES and "." in mod:
            mod = mod.rsplit(".", 1)[0]
        if mod in MODULES and mod != name:
            out.add(mod)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _floors() -> dict[str, int]:
    """room -> floor, from the table under "## Floors" in docs/code-map.md: rows
    ``| N | `tierstore/x.py`, `tierstore/pkg/` ... | ...``."""
    text = MAP.read_text()
    section = text.split("## Floors", 1)[1].split("\n## ", 1)[0]
    rooms: dict[str, int] = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if not m:
            continue
        for cited in re.findall(r"`([^`]+)`", m.group(2)):
            room = cited.rstrip("/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")
            assert room not in rooms, f"{cited} is on two floors of the map"
            rooms[room] = int(m.group(1))
    return rooms


FLOORS = _floors()


def _room(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_every_module_is_in_a_room_of_the_map():
    rooms = {_room(m) for m in MODULES}
    assert rooms - set(FLOORS) == set(), "rooms missing from the floors table of docs/code-map.md"
    assert set(FLOORS) - rooms == set(), "the floors table names rooms that do not exist"


def test_imports_between_rooms_run_down():
    up = []
    for mod, deps in GRAPH.items():
        for dep in deps:
            a, b = _room(mod), _room(dep)
            if a != b and FLOORS[b] >= FLOORS[a]:
                up.append(f"{mod} (floor {FLOORS[a]}) -> {dep} (floor {FLOORS[b]})")
    assert up == [], "imports that do not run down:\n" + "\n".join(sorted(up))


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_circle_finder_finds_a_circle():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _circles({"a": {"b"}, "b": set()}) == []


def test_no_circle_between_modules():
    assert _circles(GRAPH) == []


def test_module_names_are_unique_in_the_package():
    names = Counter(p.stem for p in MODULES.values() if p.stem not in ("__init__", "__main__"))
    assert [n for n, c in names.items() if c > 1] == []


def test_every_module_says_what_it_owns():
    bare = [m for m, p in MODULES.items()
            if len((ast.get_docstring(ast.parse(p.read_text())) or "").split()) < 8]
    assert bare == [], "modules without an opening docstring of a sentence or more"


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    head, _, rest = name.partition(".")
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == head:
            if not rest:
                return True
            return any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                       and n.name == rest for n in ast.walk(node))
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and not rest:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == head for t in targets):
                return True
    return False


def test_names_the_map_cites_exist():
    text = MAP.read_text()
    missing = []
    for cited in sorted(set(re.findall(r"`([A-Za-z_][\w/.]*\.py(?::[\w.]+)?|[a-z_]+/(?:[\w]+/)*)`", text))):
        path, _, name = cited.partition(":")
        p = ROOT / path
        if not p.exists():
            missing.append(cited)
        elif name and not _defines(p, name):
            missing.append(cited)
    assert missing == [], "docs/code-map.md cites names that do not exist"
