"""jobs/filter.py end to end on a local Ray: planted bad rows, heuristics, exact consistency ranks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]

from raylib.jobs.filter import FilterConfig, run
from raylib.config import load_config
from raylib.filters import num_consistency_shards, pair_hash

WORDS = "alpha beta gamma delta river mountain cloud engine protein galaxy music harbor".split()


def _pair(rng, i: int, tag: str) -> tuple[str, str]:
    w = rng.choice(WORDS, size=6)
    return (f"{tag} question {i} about {w[0]} {w[1]}",
            f"{tag} document {i % 17}: {w[0]} {w[1]} {w[2]} and {w[3]} {w[4]} {w[5]}.")


def make_input(root: Path, seed: int = 0) -> tuple[Path, dict]:
    """A dir with one JSONL and one Parquet file; returns (dir, expected counts and good rows)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    good: list[dict] = []
    lines: list[bytes] = []
    heur: Counter = Counter()
    for i in range(24):
        q, d = _pair(rng, i, "wiki")
        if i % 5 == 4:  # identical document texts for different queries
            d = good[-1]["document"]
        row = {"query": q, "document": d, "source": "wiki", "language": "en", "id": i}
        good.append(row)
        lines.append(json.dumps(row).encode())
    planted_bad = {
        b'{"query": null, "document": "some document text", "source": "wiki", "language": "en"}': "null:query",
        b'{"query": 12, "document": "some document text", "source": "wiki", "language": "en"}': "not_string:query",
        b'{"query": "a query", "document": "   ", "source": "wiki", "language": "en"}': "empty:document",
        b'{"query": "a query", "document": "bad \xff\xfe bytes", "source": "wiki", "language": "en"}': "undecodable:document",
        b'{"query": "broken json", "document": ': "invalid_json",
        b'{"query": "a query", "source": "wiki", "language": "en"}': "null:document",
        ('{"query": "a query", "document": "' + "long " * 100 + '", "source": "wiki", "language": "en"}').encode(): "too_long:document",
        b'{"query": "a query", "document": "some document text", "source": "wiki", "language": ["en"]}': "not_string:language",
    }
    lines += list(planted_bad)
    planted_heur = [("hi", "a perfectly fine document text", "query_length"),
                    ("a fine query", "tiny", "document_length"),
                    ("Same text as the document", "same text  as the DOCUMENT", "query_equals_document"),
                    ("a fine query", "12 34 56 78 90 | 11 22 | 33 44 55", "non_text")]
    for q, d, reason in planted_heur:
        lines.append(json.dumps({"query": q, "document": d, "source": "wiki", "language": "en"}).encode())
        heur[reason] += 1
    for row in good[:3]:  # exact duplicates of good pairs
        lines.append(json.dumps(row).encode())
        heur["duplicate"] += 1
    (root / "part-0.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    docs, queries, ids = [], [], []
    for i in range(20):
        q, d = _pair(rng, i, "news")
        good.append({"query": q, "document": d, "source": "news", "language": "de", "id": 100 + i})
        queries.append(q)
        docs.append(d.encode())
        ids.append(100 + i)
    queries += [None, "a query"]
    docs += [b"a fine document here", b"\xc3\x28 invalid"]
    ids += [200, 201]
    table = pa.table({"query": pa.array(queries, pa.string()), "document": pa.array(docs, pa.binary()),
                      "source": ["news"] * len(ids), "language": ["de"] * len(ids), "id": ids})
    pq.write_table(table, root / "part-1.parquet")
    rejected = Counter(planted_bad.values())
    rejected.update(["null:query", "undecodable:document"])
    total = len(lines) + len(ids)
    return root, {"input": total, "rejected": rejected, "heuristics": heur, "good": good}


def _config(tmp_path: Path, data: Path, model: str, **extra) -> FilterConfig:
    sets = [f"input={data}", f"output={tmp_path}",
            f"model={model}", "shard_size=16", "top_k=4", "max_chars=300", "read_blocks=1",
            "batch_size=16", "query_max_tokens=32", "document_max_tokens=48",
            "heuristics.query_min_chars=3", "heuristics.document_min_chars=10"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return load_config(FilterConfig, ROOT / "jobs/configs/filter/debug.yaml", sets)


def reference_ranks(good: list[dict], model: str, shard_size: int, top_k: int) -> dict:
    """{(query, document): rank or None if dropped}, brute force per shard with NumPy."""
    from raylib.model import Encoder

    enc = Encoder.from_pretrained(model, device="cpu")
    groups: dict[tuple, list[dict]] = {}
    for row in good:
        groups.setdefault((row["source"], row["language"]), []).append(row)
    out = {}
    for rows in groups.values():
        shards = num_consistency_shards(len(rows), shard_size)
        by_shard: dict[int, list[dict]] = {}
        for row in rows:
            by_shard.setdefault(pair_hash(row["query"], row["document"]) % shards, []).append(row)
        for members in by_shard.values():
            q = enc.encode_dense([r["query"] for r in members], "query", max_length=32).astype(np.float64)
            docs = sorted({r["document"] for r in members})
            d = enc.encode_dense(docs, "document", max_length=48).astype(np.float64)
            for i, r in enumerate(members):
                scores = d @ q[i]
                own = scores[docs.index(r["document"])]
                rank = 1 + int((scores > own).sum())
                out[(r["query"], r["document"])] = rank if rank <= top_k else None
    return out


@pytest.fixture
def patient_ray(ray_session):
    """Worker start-up on a loaded 2-core machine can exceed the session's 120 s no-progress
    timeout; a real deadlock still fails, after 10 minutes."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    old, ctx.execution_no_progress_timeout_s = ctx.execution_no_progress_timeout_s, 600
    yield ray_session
    ctx.execution_no_progress_timeout_s = old


def test_filter_job_end_to_end(patient_ray, tiny_dir, tmp_path):
    data, expected = make_input(tmp_path / "in")
    cfg = _config(tmp_path, data, str(tiny_dir))
    summary = run(cfg)

    # every input row is accounted for exactly once
    assert summary["input"] == expected["input"]
    assert summary["rejected_by_reason"] == dict(expected["rejected"])
    for name in ("query_length", "document_length", "query_equals_document", "non_text", "duplicate"):
        assert summary["dropped_by_heuristic"][name] == expected["heuristics"][name], name
    total = (summary["rejected"] + sum(summary["dropped_by_heuristic"].values())
             + summary["dropped_by_consistency"] + summary["kept"])
    assert total == summary["input"]
    assert json.loads((tmp_path / "summary.json").read_text())["kept"] == summary["kept"]
    assert summary["shards"]["count"] == 4  # 24 and 20 pairs, shard_size 16 -> 2 + 2 shards
    assert all(v["rows"] >= 0 for v in summary["throughput"].values())

    rejects = pads.dataset(tmp_path / "rejects", format="parquet").to_table().to_pylist()
    assert len(rejects) == summary["rejected"]
    assert all(r["reason"] for r in rejects)
    assert any(r["raw"] and "broken json" in r["raw"] for r in rejects)  # unparseable line kept

    kept = pads.dataset(tmp_path / "kept", format="parquet").to_table().to_pylist()
    assert len(kept) == summary["kept"] > 0
    assert {"query", "document", "source", "language", "id", "shard", "consistency_rank"} <= set(kept[0])
    assert summary["dropped_by_consistency"] > 0

    # the job's ranks equal a brute-force NumPy reference, pair by pair
    ref = reference_ranks(expected["good"], str(tiny_dir), 16, 4)
    got = {(r["query"], r["document"]): r["consistency_rank"] for r in kept}
    assert got == {k: v for k, v in ref.items() if v is not None}


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(FilterConfig, ROOT / "jobs/configs/filter/debug.yaml", ["top_kk=3"])
    with pytest.raises(ValueError, match="heuristics.min_ratio"):
        load_config(FilterConfig, ROOT / "jobs/configs/filter/debug.yaml", ["heuristics.min_ratio=3"])
    cfg = load_config(FilterConfig, ROOT / "jobs/configs/filter/h100.yaml")
    assert cfg.top_k == 20 and cfg.shard_size == 3_000_000 and cfg.model == "me5-small"


def test_cli_rejects_unknown_key(tmp_path, capsys):
    from raylib.jobs.filter import main

    with pytest.raises(SystemExit):
        main(["--config", str(ROOT / "jobs/configs/filter/debug.yaml"), "--set", "nope=1"])
    assert "unknown config key" in capsys.readouterr().err


def test_shard_parts_round_trip(tmp_path):
    """Shard parts (no Ray session): rows split by (source, language, shard), embeddings exact."""
    from raylib.ray_data.consistency import (_matrix, delete_scratch, group_dir, shard_manifest,
                                             write_shard_parts)

    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 3)).astype(np.float32)
    table = pa.table({"query": [f"q{i}" for i in range(6)], "document": [f"d{i}" for i in range(6)],
                      "source": ["a", "a", "b", "a", "b", "a"], "language": ["en"] * 6,
                      "shard": pa.array([0, 1, 0, 0, 0, 1], pa.int64()),
                      "_q_emb": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 3)})
    import pyarrow.fs as pafs

    scratch, fs = str(tmp_path / "scratch"), pafs.LocalFileSystem()
    manifest = write_shard_parts(table, fs, scratch, [])
    assert manifest.column("rows").to_pylist() == [2, 2, 2]  # (a,0), (a,1), (b,0)
    for rec in manifest.to_pylist():
        assert f"/{group_dir(rec['source'], 'en')}/shard={rec['shard']:06d}/" in rec["path"]
        part = pq.read_table(rec["path"])
        assert set(part.column("source").to_pylist()) == {rec["source"]}
        ids = [int(q[1:]) for q in part.column("query").to_pylist()]
        np.testing.assert_array_equal(_matrix(part.column("_q_emb")), emb[ids])

    class Parts:  # the part-writing dataset's interface, as shard_manifest consumes it
        def iter_batches(self, **_):
            yield manifest.slice(0, 2)
            yield write_shard_parts(table.slice(3), fs, scratch, [])

    shards = shard_manifest(Parts())
    assert [(s["source"], s["shard"], s["rows"], len(s["paths"])) for s in shards] == [
        ("a", 0, 3, 2), ("a", 1, 3, 2), ("b", 0, 1, 1)]
    delete_scratch(scratch)
    assert not (tmp_path / "scratch").exists()
