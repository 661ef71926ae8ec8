"""The code's shape: no import circle (imports inside functions and under TYPE_CHECKING included),
the core imports neither Ray nor the glue, the glue packages hold only code that talks to Ray, and
no source file outside tests is over 600 lines. Static (ast); only the torch-free import check runs
imports (in a subprocess)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("raylib", "jobs", "bench")
# the glue: what talks to Ray (Ray start-up, Ray Data, Ray Train, Ray Serve) and the jobs above it
GLUE = ("raylib.ray_env", "raylib.ray_data", "raylib.ray_train", "raylib.ray_serve", "raylib.jobs")
RAY_GLUE = ("raylib.ray_data", "raylib.ray_train")  # every module here imports ray (the Serve app also holds its schemas)
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Every module name an import statement anywhere in the file names (`from a import b`: a.b and a)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def graph() -> dict[str, set[str]]:
    """Edges between this repository's modules (bench scripts import each other by bare name)."""
    mods = modules()
    out = {}
    for name, path in mods.items():
        targets = set()
        for imported in imported_names(path):
            if name.startswith("bench.") and f"bench.{imported}" in mods:
                imported = f"bench.{imported}"
            if imported in mods and imported != name:
                targets.add(imported)
        out[name] = targets
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def is_glue(name: str) -> bool:
    return any(name == g or name.startswith(g + ".") for g in GLUE)


def imports_ray(path: Path) -> bool:
    return any(n == "ray" or n.startswith("ray.") for n in imported_names(path))


def test_no_import_circle():
    assert cycles(graph()) == []


def test_core_imports_no_ray_and_no_glue():
    mods, edges = modules(), graph()
    core = [m for m in mods if m.startswith("raylib") and not is_glue(m)]
    assert [m for m in core if imports_ray(mods[m])] == []
    assert {m: sorted(t for t in edges[m] if is_glue(t) or not t.startswith("raylib"))
            for m in core if any(is_glue(t) or not t.startswith("raylib") for t in edges[m])} == {}


def test_glue_packages_hold_only_ray_code():
    mods = modules()
    pure = [m for m, p in mods.items() if any(m.startswith(g + ".") for g in RAY_GLUE)
            and not m.endswith("__init__") and p.name != "__init__.py" and not imports_ray(p)]
    assert pure == []


def test_no_source_file_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_row_routing_modules_import_without_torch():
    """A Ray Data task that only reads, routes or writes rows (its function's module is what the
    worker imports) does not pay torch's 1.5-2 s import: `raylib` loads its model names lazily."""
    import subprocess
    import sys

    code = ("import sys, raylib, raylib.ray_data.io, raylib.ray_data.mining, raylib.ray_data.consistency, "
            "raylib.ray_data.embed, raylib.storage, raylib.reader; print(sorted(m for m in ('torch', "
            "'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
    from raylib import Encoder  # the public names still resolve, on first use

    assert Encoder.__module__ == "raylib.model"
