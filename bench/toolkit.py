"""What every bench shares: ports, memory sampling, one subprocess per size, texts, the last line.

Benches run as scripts (`python bench/<name>.py` from the repository root: Python puts bench/ first
on sys.path) and import this module by its bare name, `from toolkit import ...`; bench/gpu/checks.py
puts bench/ on sys.path itself. Importing it costs only the standard library: no Ray, and raylib
(whose package imports torch) and psutil load when a function here first needs them.

  free_port()                  raylib.ports' one helper, re-exported
  MemorySampler(...)           with-block: peak RSS / private memory of this process (+ children)
  run_per_size(script, sizes)  one fresh child process per size, each child's JSON result in order
  report_to_parent(result)     the child's side of run_per_size: its result as one JSON line
  scifact_texts(n, max_chars)  SciFact documents (synthetic text when the data is absent)
  beir_texts(root)             (kind, text) of every document and query of a BEIR folder
  emit(__file__, result)       the bench's last stdout line: {"bench": "<script stem>", **result}
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

__all__ = ["ROOT", "SHARED_DATA", "MIB", "free_port", "MemorySampler", "ChildFailed", "run_per_size",
           "report_to_parent", "last_json", "scifact_texts", "beir_texts", "bench_name", "emit"]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"  # ../shared/data: SciFact, XQuAD (BEIR format)
MIB = 1 << 20


def __getattr__(name: str):
    """`free_port`: raylib.ports' helper, the project's only one, loaded on first use (PEP 562)."""
    if name == "free_port":
        from raylib.ports import free_port

        return free_port
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ----------------------------------------------------------------------------- memory
class MemorySampler:
    """Samples the memory of a process (default: this one) and, with children=True, of all its
    descendants every `interval_ms` in a daemon thread, from entering the block to leaving it
    (one last sample on exit). `label(proc)` names each process (None: not counted); peaks are
    kept per (pid, label): RSS, private (RSS minus shared pages, i.e. without mapped files such
    as Ray's object store) and, per sample, the sum over the counted processes (RSS, or PSS with
    pss=True, read with memory_full_info)."""

    def __init__(self, interval_ms: float = 500, children: bool = False, root_pid: int | None = None,
                 label: Callable[[object], str | None] | None = None, pss: bool = False):
        self.interval_s, self.children, self.pss = interval_ms / 1000, children, pss
        self.root_pid = root_pid or os.getpid()
        self.label = label or (lambda p: "root" if p.pid == self.root_pid else "child")
        self.rss: dict[tuple[int, str], int] = {}
        self.private: dict[tuple[int, str], int] = {}
        self.total_peak = 0  # bytes: the largest per-sample sum
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="MemorySampler")

    @property
    def peak_mib(self) -> float:
        """Peak of the summed RSS (PSS with pss=True) of the counted processes, MiB."""
        return self.total_peak / MIB

    def _processes(self) -> list:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            return [root, *root.children(recursive=True)] if self.children else [root]
        except psutil.Error:
            return []

    def sample(self) -> None:
        """One reading of every process (those gone or not readable are skipped)."""
        import psutil

        total = 0
        for proc in self._processes():
            try:
                info = proc.memory_full_info() if self.pss else proc.memory_info()
                name = self.label(proc)
            except psutil.Error:
                continue
            if name is None:
                continue
            key, private = (proc.pid, name), info.rss - getattr(info, "shared", 0)
            self.rss[key] = max(self.rss.get(key, 0), info.rss)
            self.private[key] = max(self.private.get(key, 0), private)
            total += getattr(info, "pss", info.rss) if self.pss else info.rss
        self.total_peak = max(self.total_peak, total)

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                break
        self.sample()

    def by_label(self, kind: str = "private") -> dict[str, int]:
        """Largest single process per label, bytes (kind: "rss" or "private")."""
        out: dict[str, int] = {}
        for (_, name), value in getattr(self, kind).items():
            out[name] = max(out.get(name, 0), value)
        return out

    def by_pid(self, kind: str = "private") -> dict[int, tuple[int, str]]:
        """Per process: (peak bytes, its label at that peak) (kind: "rss" or "private")."""
        out: dict[int, tuple[int, str]] = {}
        for (pid, name), value in getattr(self, kind).items():
            if value > out.get(pid, (0, ""))[0]:
                out[pid] = (value, name)
        return out

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- one process per size
class ChildFailed(RuntimeError):
    """A run_per_size child exited non-zero or printed no JSON object (`why`: which)."""

    def __init__(self, size: int, why: str, argv: list[str], stderr: str):
        super().__init__(f"size {size}: child failed ({why}): {' '.join(argv)}\n"
                         f"stderr tail:\n{stderr[-3000:]}")
        self.size, self.why = size, why


def last_json(stdout: str) -> dict | None:
    """The last stdout line that is a JSON object (later log lines are skipped), or None."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def report_to_parent(result: dict) -> None:
    """A run_per_size child's result: one JSON line on stdout (read by last_json)."""
    print(json.dumps(result, default=str), flush=True)


def _run_child(argv: list[str], size: int, env: dict | None, cwd: str | Path | None) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    result = last_json(proc.stdout) if proc.returncode == 0 else None
    if result is None:
        why = f"exit {proc.returncode}" if proc.returncode else "no JSON line on stdout"
        raise ChildFailed(size, why, argv, proc.stderr)
    return result


def run_per_size(script: str | Path | Sequence[str], sizes: Iterable[int], args: Sequence[str] = (),
                 flag: str = "--child", env: dict | None = None, cwd: str | Path | None = None,
                 keep_going: bool = False, each: Callable[[int, dict], None] | None = None) -> list[dict]:
    """Run `script` (a path, run with this interpreter, or an argv prefix) once per size in a fresh
    process as `<script> <flag> <size> <args...>`; returns each child's last JSON line, in size
    order. A failed child raises ChildFailed (exit code, stderr tail); keep_going=True prints that
    to stderr and puts {"error": <why>} in its place. `each(size, result)` runs as each ends."""
    prefix = [sys.executable, str(script)] if isinstance(script, (str, Path)) else list(script)
    results = []
    for size in sizes:
        try:
            result = _run_child([*prefix, flag, str(size), *map(str, args)], size, env, cwd)
        except ChildFailed as exc:
            if not keep_going:
                raise
            print(exc, file=sys.stderr)
            result = {"error": exc.why}
        results.append(result)
        if each is not None:
            each(size, result)
    return results


# ----------------------------------------------------------------------------- texts
def scifact_texts(n: int, max_chars: int, seed: int = 0, shuffle: bool = True,
                  root: Path = SHARED_DATA / "scifact") -> list[str]:
    """n SciFact documents (title + text) cut to max_chars: the first 4n of the corpus, shuffled
    with `seed` (shuffle=False: the first n); synthetic text if the data is absent."""
    if (root / "corpus.jsonl").exists():
        from raylib.beir import document_text

        docs = []
        with open(root / "corpus.jsonl", encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    docs.append(document_text(json.loads(line))[:max_chars])
                if len(docs) >= 4 * n:
                    break
    else:
        words = "protein cell gene expression patient risk trial effect model data".split()
        rng = random.Random(seed)
        docs = [" ".join(rng.choice(words) for _ in range(40))[:max_chars] for _ in range(4 * n)]
    if shuffle:
        random.Random(seed).shuffle(docs)
    return docs[:n]


def beir_texts(root: str | Path) -> list[tuple[str, str]]:
    """("document", title + text) of every corpus line, then ("query", text) of every query line
    of a BEIR folder (all queries, not only those with qrels: raylib.beir.load_beir keeps those)."""
    from raylib.beir import document_text

    root = Path(root)
    out = []
    for name, kind in (("corpus.jsonl", "document"), ("queries.jsonl", "query")):
        with open(root / name, encoding="utf-8-sig") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        out += [(kind, document_text(r) if kind == "document" else r["text"]) for r in rows]
    return out


# ----------------------------------------------------------------------------- the last line
def bench_name(bench: str | Path) -> str:
    """A bench's name: the stem of its script path (`__file__`), or the name given."""
    text = str(bench)
    return Path(text).stem if text.endswith(".py") else text


def emit(bench: str | Path, result: dict) -> dict:
    """Print the bench's last stdout line, one JSON object: {"bench": <name>, **result}
    (a "bench" key in result is replaced; values JSON cannot hold are written as str)."""
    line = {"bench": bench_name(bench), **{k: v for k, v in result.items() if k != "bench"}}
    print(json.dumps(line, default=str), flush=True)
    return line
