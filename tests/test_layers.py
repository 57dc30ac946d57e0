"""The package's shape: layers that import one way, and no import circles between files.

Each module of ``src/alignloop`` sits in one layer (README, "Architecture"); it may import from its
own layer or below, never above, and the places named in ``INDEPENDENT`` never import each other.
Every import counts, including those inside functions (imported on use to keep ``--help`` fast):
an import deferred to call time is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "alignloop"

# Bottom to top. A place is a module or a package (its submodules included).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("alignloop", "alignloop.errors", "alignloop.config"),
    ("alignloop.data", "alignloop.models", "alignloop.feedback", "alignloop.runs"),
    ("alignloop.losses", "alignloop.advantages", "alignloop.report"),
    ("alignloop.rollout",),
    ("alignloop.train", "alignloop.evaluate"),
    ("alignloop.serve", "alignloop.loop", "alignloop.envs"),
    ("alignloop.cli", "alignloop.demo", "alignloop.__main__"),
)
# Same layer, yet neither may import the other: what both need moves down a layer.
INDEPENDENT = (("alignloop.train", "alignloop.evaluate"),)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def place_of(module: str) -> str:
    """The most specific place of LAYERS that holds ``module``."""
    places = [p for layer in LAYERS for p in layer if module == p or module.startswith(p + ".")]
    if not places:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's architecture table)")
    return max(places, key=len)


def layer_of(module: str) -> int:
    place = place_of(module)
    return next(i for i, layer in enumerate(LAYERS) if place in layer)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported alignloop module, line) for every import in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names if alias.name.split(".")[0] == "alignloop"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "alignloop":
            # `from alignloop.evaluate import compare` imports the module alignloop.evaluate.compare
            submodules = [f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known]
            found += [(m, node.lineno) for m in submodules or [node.module]]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write `from alignloop.… import …`")
    return found


def import_graph() -> dict[str, list[tuple[str, int]]]:
    found = modules()
    known = set(found)
    graph = {}
    for name, path in found.items():
        first_line: dict[str, int] = {}  # each imported module once, at its first import
        for target, line in imports(path, known):
            if target in known and target != name:
                first_line.setdefault(target, line)
        graph[name] = list(first_line.items())
    return graph


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(SRC.parent)}:{line}"


def test_every_module_sits_in_a_layer() -> None:
    for name in modules():
        place_of(name)


def test_no_import_points_up_a_layer() -> None:
    wrong = []
    for name, targets in import_graph().items():
        for target, line in targets:
            if layer_of(target) > layer_of(name):
                wrong.append(f"{where(name, line)}: {name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})")
    assert not wrong, "imports that point up a layer:\n" + "\n".join(wrong)


def test_independent_places_do_not_import_each_other() -> None:
    wrong = []
    for name, targets in import_graph().items():
        for target, line in targets:
            pair = {place_of(name).split(".")[1], place_of(target).split(".")[1]}
            for a, b in INDEPENDENT:
                if pair == {a.split(".")[1], b.split(".")[1]}:
                    wrong.append(f"{where(name, line)}: {name} imports {target}")
    assert not wrong, "train and evaluate are siblings; move what both need down a layer:\n" + "\n".join(wrong)


def test_no_import_circles_between_files() -> None:
    graph = import_graph()
    circles = []
    for start in graph:  # depth-first search for a path from start back to itself
        stack = [(start, [start])]
        seen = set()
        while stack:
            node, path = stack.pop()
            for target, _ in graph[node]:
                if target == start:
                    circles.append(path)
                elif target not in seen and target > start:  # report each circle once, from its smallest module
                    seen.add(target)
                    stack.append((target, path + [target]))
    described = []
    for path in circles:
        hops = zip(path, path[1:] + path[:1])
        described.append(" → ".join(f"{a} ({where(a, next(line for t, line in graph[a] if t == b))})" for a, b in hops))
    assert not described, "import circles:\n" + "\n".join(described)


def fake_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: dict[str, str]) -> None:
    """A copy of the package with ``extra`` files added, which the checks above then read."""
    package = tmp_path / "src" / "alignloop"
    for path in PACKAGE.rglob("*.py"):
        target = package / path.relative_to(PACKAGE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    for name, source in extra.items():
        (package / name).write_text(source)
    monkeypatch.setitem(globals(), "SRC", tmp_path / "src")
    monkeypatch.setitem(globals(), "PACKAGE", package)


@pytest.mark.parametrize(("source", "message"), [
    ("from alignloop.cli import run\n", r"src/alignloop/data/upward.py:1: alignloop.data.upward \(layer 1\) imports alignloop.cli \(layer 6\)"),
    ("def f():\n    from alignloop.train.loop import resume\n", r"upward.py:2: .* imports alignloop.train.loop \(layer 4\)"),
])
def test_the_check_names_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, message: str) -> None:
    """A module of layer 1 that imports from above is refused, at module level or inside a function."""
    fake_package(tmp_path, monkeypatch, {"data/upward.py": source})
    with pytest.raises(AssertionError, match=message):
        test_no_import_points_up_a_layer()


def test_the_check_names_a_circle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_package(tmp_path, monkeypatch, {"data/first.py": "from alignloop.data import second\n",
                                         "data/second.py": "x = 1\n\n\ndef f():\n    from alignloop.data.first import f\n"})
    with pytest.raises(AssertionError, match=r"alignloop.data.first \(src/alignloop/data/first.py:1\) → "
                                             r"alignloop.data.second \(src/alignloop/data/second.py:5\)"):
        test_no_import_circles_between_files()
