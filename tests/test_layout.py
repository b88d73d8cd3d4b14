"""The house rules of the layout (README "Layout"), checked on the source itself: no source file over 600
lines, the trainer's step short and engine-free, the user-facing error types at the ground floor, and no
import circle between the package's rooms (a room: a top-level module of mrpo/, or a subpackage with its
modules, e.g. mrpo.judges; inside a room, a package __init__ re-exporting its modules is not a circle)."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("mrpo", "mrpo_kernels", "benchmarks", "tests")
MAX_LINES = 600
TRAINER_MAX_LINES = 350


def _modules() -> dict[str, Path]:
    mods = {}
    for top in ("mrpo", "mrpo_kernels"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """Every module of ours that `name` imports, at module level or inside a function (a lazy import is an
    arrow too: it runs whenever that function does)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def ours(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(filter(None, (ours(a.name) for a in node.names)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in mods else ours(base))
    found.discard(None)
    found.discard(name)
    return found


def _room(name: str, mods: dict) -> str:
    """mrpo.judges.http -> mrpo.judges (a subpackage is one room); mrpo.plan -> mrpo.plan; mrpo_kernels.x -> mrpo_kernels."""
    parts = name.split(".")
    if parts[0] == "mrpo_kernels":
        return "mrpo_kernels"
    return ".".join(parts[:2])


def room_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        room = _room(name, mods)
        graph.setdefault(room, set()).update(_room(d, mods) for d in _imports(name, path, mods))
    for room, deps in graph.items():
        deps.discard(room)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one room (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job (README Layout): {long}"


def test_trainer_is_short_and_engine_free():
    source = (ROOT / "mrpo" / "trainer.py").read_text()
    assert len(source.splitlines()) <= TRAINER_MAX_LINES
    tree = ast.parse(source)
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
        n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names} | {
        n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    engine_words = ("fsdp", "deepspeed", "zero3", "fully_shard")
    hits = sorted(x for x in names | imported if any(w in x.lower() for w in engine_words))
    assert not hits, f"engine names in trainer.py (they belong in mrpo/engines/): {hits}"


def test_errors_module_is_the_ground_floor():
    mods = _modules()
    assert not _imports("mrpo.errors", mods["mrpo.errors"], mods)
    # whoever raises a UserInputError kind imports it from mrpo.errors, never through mrpo.config
    offenders = []
    for name, path in mods.items():
        if name == "mrpo.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "mrpo.config" and any(
                    a.name.endswith("Error") for a in node.names):
                offenders.append(name)
    assert not offenders, f"import error types from mrpo.errors: {sorted(set(offenders))}"


def test_no_import_circle_between_rooms():
    assert _cycles(room_graph()) == []


def test_cycle_finder_finds_a_circle():
    """The check above can fail: a two-room circle and a three-room one are found, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("room", ["mrpo.errors", "mrpo.config_schema"])
def test_ground_floor_rooms_import_nothing_above(room):
    assert not room_graph().get(room, set()) - {"mrpo.errors"}
