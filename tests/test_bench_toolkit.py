"""bench/toolkit.py, what every bench shares: the last JSON line names the bench, the memory sampler
sees an allocation (in this process and in a child), one process per size returns the children's
JSON in order and fails clearly; and a static check that every bench uses the toolkit instead of
keeping its own port helper, sampler, per-size driver or hand-named JSON."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
_spec = importlib.util.spec_from_file_location("toolkit", BENCH / "toolkit.py")
toolkit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(toolkit)

# every bench script: bench/*.py but the toolkit, and the GPU proof's checks (build_kit builds wheels)
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "toolkit.py") + [BENCH / "gpu" / "checks.py"]

CHILD = """import json, sys
argv = sys.argv[1:]
at = argv.index("--child")
size = int(argv[at + 1])
if size < 0:
    print("bad size", file=sys.stderr)
    sys.exit(3)
print("a log line first")
if size == 0:
    sys.exit(0)
print(json.dumps({"size": size, "rest": argv[at + 2:]}))
print("and a log line after the result")
"""


def test_emit_prints_one_last_line_naming_the_bench(capsys):
    print("figures before")
    line = toolkit.emit("/x/bench/filter_scale.py", {"bench": "old", "pairs": 3, "path": Path("/tmp/a")})
    out = capsys.readouterr().out.strip().splitlines()
    got = json.loads(out[-1])
    assert list(got) == ["bench", "pairs", "path"] and line["bench"] == "filter_scale"
    assert got == {"bench": "filter_scale", "pairs": 3, "path": "/tmp/a"}
    assert toolkit.bench_name("gpu_checks") == "gpu_checks"


def test_memory_sampler_sees_an_allocation_made_inside_it():
    before = psutil.Process().memory_info().rss / toolkit.MIB
    with toolkit.MemorySampler(interval_ms=10) as mem:
        block = b"x" * (50 << 20)  # written, so resident
        time.sleep(0.05)
    assert len(block) == 50 << 20
    assert mem.peak_mib >= before + 45, (before, mem.peak_mib)
    assert mem.by_label("rss")["root"] >= (before + 45) * toolkit.MIB
    assert set(mem.by_pid("private")) == {psutil.Process().pid}


def test_memory_sampler_sees_children_and_their_labels():
    code = "import time; b = b'x' * (60 << 20); print('ready', flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        label = lambda p: "me" if p.pid == psutil.Process().pid else "kid"  # noqa: E731
        with toolkit.MemorySampler(interval_ms=10, children=True, label=label) as mem:
            time.sleep(0.05)
        assert mem.by_label("rss")["kid"] >= 60 * toolkit.MIB
        assert set(mem.by_label("private")) == {"me", "kid"}
        assert mem.by_pid("rss")[child.pid][1] == "kid"
    finally:
        child.kill()
        child.wait()


def test_run_per_size_returns_each_childs_json_in_size_order(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    seen = []
    got = toolkit.run_per_size(script, [3, 1, 2], ["--dim", 8], each=lambda n, r: seen.append(n))
    assert got == [{"size": n, "rest": ["--dim", "8"]} for n in (3, 1, 2)]
    assert seen == [3, 1, 2]
    prefix = [sys.executable, str(script)]
    assert toolkit.run_per_size(prefix, [5], flag="--child") == [{"size": 5, "rest": []}]


def test_run_per_size_fails_clearly(tmp_path, capsys):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    with pytest.raises(toolkit.ChildFailed, match=r"size -1: child failed \(exit 3\)(.|\n)*bad size"):
        toolkit.run_per_size(script, [1, -1, 2])
    with pytest.raises(toolkit.ChildFailed, match="no JSON line"):
        toolkit.run_per_size(script, [0])
    got = toolkit.run_per_size(script, [1, -1], keep_going=True)
    assert got == [{"size": 1, "rest": []}, {"error": "exit 3"}]
    assert "bad size" in capsys.readouterr().err


def test_texts(tmp_path):
    root = tmp_path / "beir"
    root.mkdir()
    (root / "corpus.jsonl").write_text("".join(json.dumps({"_id": str(i), "title": f"T{i}", "text": "x" * 9})
                                               + "\n" for i in range(8)))
    (root / "queries.jsonl").write_text('{"_id": "q", "text": "what"}\n\n')
    assert toolkit.beir_texts(root)[0] == ("document", "T0 xxxxxxxxx")
    assert toolkit.beir_texts(root)[-1] == ("query", "what") and len(toolkit.beir_texts(root)) == 9
    assert toolkit.scifact_texts(2, 4, shuffle=False, root=root) == ["T0 x", "T1 x"]
    shuffled = toolkit.scifact_texts(2, 4, seed=1, root=root)  # 2 of the first 8, seeded
    assert shuffled == toolkit.scifact_texts(2, 4, seed=1, root=root) and set(shuffled) < {f"T{i} x" for i in range(8)}
    synthetic = toolkit.scifact_texts(3, 50, root=tmp_path / "absent")
    assert len(synthetic) == 3 and all(0 < len(t) <= 50 for t in synthetic)


# ----------------------------------------------------------------------------- static checks
def _called(call: ast.Call) -> str:
    """The dotted name a call calls (`subprocess.run`, `json.loads`, `emit`), "" if none."""
    f, parts = call.func, []
    while isinstance(f, ast.Attribute):
        parts.append(f.attr)
        f = f.value
    return ".".join([f.id, *reversed(parts)]) if isinstance(f, ast.Name) else ""


def _calls(node: ast.AST) -> list[str]:
    """Dotted names of every call under node."""
    return [_called(n) for n in ast.walk(node) if isinstance(n, ast.Call)]


def _own_helpers(path: Path) -> list[str]:
    """What a bench must not keep for itself (the toolkit has it)."""
    tree = ast.parse(path.read_text())
    found = []
    for n in ast.walk(tree):
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in n.names] + ([n.module] if isinstance(n, ast.ImportFrom) else [])
            found += [f"imports {m}" for m in names if m in ("psutil", "socket", "serve_bench")]
        if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and "free_port" in n.name:
            found.append(f"def {n.name}")
        if isinstance(n, ast.Attribute) and n.attr in ("memory_info", "memory_full_info"):
            found.append(f"samples .{n.attr}")
        if isinstance(n, ast.FunctionDef):
            calls = _calls(n)
            if any(c.startswith("subprocess.") for c in calls) and "json.loads" in calls:
                found.append(f"{n.name}: runs a child and parses its JSON (toolkit.run_per_size)")
        if isinstance(n, ast.Dict) and any(isinstance(k, ast.Constant) and k.value == "bench" for k in n.keys):
            found.append('a hand-written "bench" key (toolkit.emit names the bench)')
    return found


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: str(p.relative_to(BENCH)))
def test_every_bench_uses_the_toolkit(path):
    tree = ast.parse(path.read_text())
    assert any(isinstance(n, ast.ImportFrom) and n.module == "toolkit" for n in ast.walk(tree))
    emits = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _called(n) == "emit"]
    assert emits and all(isinstance(c.args[0], ast.Name) and c.args[0].id == "__file__" for c in emits)
    assert _own_helpers(path) == []
    if path.parent == BENCH:  # run as `python bench/<name>.py`: bench/ is already first on sys.path
        assert "sys.path" not in path.read_text()


def test_the_static_check_catches_each_helper(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import psutil, socket, json, subprocess\n"
                   "def _free_port():\n    pass\n"
                   "def drive(n):\n    out = subprocess.run(['x'])\n    return json.loads(out.stdout)\n"
                   "def peak(p):\n    return p.memory_info().rss\n"
                   "R = {'bench': 'bad'}\n")
    assert len(_own_helpers(bad)) == 6


def test_no_six_identical_lines_repeated_in_bench():
    """No run of 6 identical lines (stripped; blank lines and import lines do not count) twice."""
    seen: dict[tuple, str] = {}
    repeated = []
    for path in sorted(BENCH.rglob("*.py")):
        lines = [(i + 1, s.strip()) for i, s in enumerate(path.read_text().splitlines())]
        kept = [(i, s) for i, s in lines if s and not s.startswith(("import ", "from "))]
        for k in range(len(kept) - 5):
            run = tuple(s for _, s in kept[k:k + 6])
            where = f"{path.relative_to(BENCH)}:{kept[k][0]}"
            if run in seen:
                repeated.append((seen[run], where, run[0]))
            seen.setdefault(run, where)
    assert repeated == []
