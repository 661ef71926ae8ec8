"""The prepare stage and the Train workers' reads: token ids equal the objective's own tokenization
(one padding path), rejects and length buckets, and (Ray) the rows each worker reads at every step
equal a plain-Python reference of the plan, whatever the input's file layout."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raylib.objectives.contrastive import ContrastiveObjective
from raylib.objectives.finetune import FinetuneObjective
from raylib.prepare import PrepareSpec, prepare_batch
from raylib.train_data import iter_prepared_steps, make_plan, runs_of, synthetic_pairs, table_rows
from raylib.tiny import tiny_encoder

TINY = {"hidden_size": 32, "num_layers": 2, "max_length": 64}


def _spec(**kw) -> PrepareSpec:
    return PrepareSpec(**{"kind": "pairs", "model": "tiny", "tiny": tuple(sorted(TINY.items())),
                          "query_max_length": 8, "document_max_length": 12, **kw})


def _mined(n: int) -> pa.Table:
    words = ["cat", "dog", "fish", "bird", "tree", "rock", "sun", "moon"]
    rng = np.random.default_rng(0)
    rows = {"id": [], "query": [], "positive": [], "negatives": [], "positive_score": [],
            "negative_scores": [], "source": [], "language": []}
    for i in range(n):
        rows["id"].append(f"m{i}")
        rows["query"].append(" ".join(rng.choice(words, 2)))
        rows["positive"].append(" ".join(rng.choice(words, 3 + i % 9)))
        k = i % 3  # 0..2 mined negatives: short rows are filled in-batch
        rows["negatives"].append([" ".join(rng.choice(words, 4)) for _ in range(k)])
        rows["positive_score"].append(0.9)
        rows["negative_scores"].append([0.5 - 0.1 * j for j in range(k)])
        rows["source"].append("s")
        rows["language"].append("en")
    return pa.table(rows)


def _as_read(table: pa.Table) -> pa.Table:
    """What the text readers (raylib.ray_data.io) hand over: every column as text, lists as JSON."""
    cols = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        cols[name] = [v if isinstance(v, str) or v is None else json.dumps(v) for v in values]
    return pa.table(cols)


def test_prepared_ids_give_the_same_features_as_texts():
    """Contrastive and finetune objectives: features of prepared rows == features of the texts ==
    the previous tokenize(padding=True) path, bit for bit (one padding function)."""
    encoder = tiny_encoder(**TINY)
    pairs = synthetic_pairs(12, seed=1)
    prepared = prepare_batch(_as_read(pairs), _spec())
    objective = ContrastiveObjective(query_max_length=8, document_max_length=12)
    text_rows = pairs.to_pydict()
    from_ids = objective.features(encoder, table_rows(prepared.drop_columns(["source", "part", "reason"]), "x"))
    from_text = objective.features(encoder, text_rows)
    padded = {"query": encoder.tokenize(text_rows["query"], "query", 8),
              "document": encoder.tokenize(text_rows["document"], "document", 12)}
    for side in ("query", "document"):
        for k in ("input_ids", "attention_mask"):
            assert torch.equal(from_ids[side][k], from_text[side][k])
            assert torch.equal(from_text[side][k], padded[side][k].long())
    mined = _mined(9)
    spec = _spec(kind="mined", num_negatives=2)
    rows = table_rows(prepare_batch(_as_read(mined), spec).drop_columns(["source", "part", "reason"]), "s")
    ft = FinetuneObjective(num_negatives=2, query_max_length=8, document_max_length=12)
    a, b = ft.features(encoder, rows), ft.features(encoder, mined.to_pydict())
    assert all(torch.equal(a[s][k], b[s][k]) for s in a for k in a[s])
    reps = {s: ft.embed(encoder, s, f) for s, f in a.items()}
    la, ma = ft.loss(reps, a, rows)
    lb, mb = ft.loss(reps, b, mined.to_pydict())
    assert float(la) == float(lb) and ma["filled_negatives"] == mb["filled_negatives"] > 0


def test_prepare_batch_rejects_and_length_buckets():
    table = _as_read(synthetic_pairs(6, seed=0))
    docs = table.column("document").to_pylist()
    docs[1], docs[2] = "", " ".join(["cat"] * 30)  # an empty document; a long one
    table = table.set_column(table.column_names.index("document"), "document", pa.array(docs))
    out = prepare_batch(table, _spec(length_bounds=(8, 16)))
    reasons, sources = out.column("reason").to_pylist(), out.column("source").to_pylist()
    assert reasons[1] == "empty:document" and sources[1] == "" and out.column("query_ids")[1].as_py() == []
    assert sources[2] == "web/en#len<=16"  # 30 words truncated to 12 tokens: the 16 bucket
    assert all(s.endswith("#len<=8") or s.endswith("#len<=16") for i, s in enumerate(sources) if i != 1)
    assert max(len(x) for x in out.column("document_ids").to_pylist()) == 12
    # the key is seeded and depends on the content only
    again = prepare_batch(table.take([5, 4, 3, 2, 1, 0]), _spec(length_bounds=(8, 16)))
    assert again.column("key").to_pylist() == out.column("key").to_pylist()[::-1]
    assert prepare_batch(table, _spec(seed=1)).column("key").to_pylist() != out.column("key").to_pylist()


def test_runs_of_splits_wrapped_ranges():
    assert runs_of(np.array([7, 8, 9, 0, 1])) == [(7, 10), (0, 2)]
    assert runs_of(np.array([3])) == [(3, 4)]


def _reference_steps(table: pa.Table, seed: int, batch: int, workers: int, epochs: int) -> list[list[list[str]]]:
    """Plain Python: per source (source/language) rows sorted by blake2b(seed; id, query, document),
    epoch e rotated by rng([seed, e, 1000 + i]).integers(n) and cut into full batches, all batches
    of an epoch shuffled by rng([seed, e, 7]); worker r gets the r-th slice. [step][rank] -> ids."""
    rows = table.to_pylist()
    by_source: dict[str, list] = {}
    for r in rows:
        key = f"{r['source']}/{r['language']}" if r["language"] else r["source"]
        text = "\x1f".join(str(r.get(c) or "") for c in ("id", "query", "document", "positive"))
        h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8, key=str(seed).encode()).digest(), "big") >> 1
        by_source.setdefault(key, []).append((h, r["id"]))
    names = sorted(by_source)
    ordered = {s: [i for _, i in sorted(by_source[s])] for s in names}
    steps = []
    for epoch in range(epochs):
        items = [(s, b) for s in names for b in range(len(ordered[s]) // batch)]
        order = np.random.default_rng([seed, epoch, 7]).permutation(len(items))
        for j in order:
            s, b = items[j]
            n = len(ordered[s])
            offset = int(np.random.default_rng([seed, epoch, 1000 + names.index(s)]).integers(n))
            ids = [ordered[s][(offset + b * batch + k) % n] for k in range(batch)]
            per = batch // workers
            steps.append([ids[r * per:(r + 1) * per] for r in range(workers)])
    return steps


@pytest.mark.slow
def test_workers_read_exactly_the_reference_plan(ray_session, tmp_path):
    """Prepare a small set twice (2 files vs 5 files in another row order, other partition count):
    the same manifest counts, and at every step each worker reads exactly the rows the plain-Python
    reference gives it (ids), from shards with small row groups (runs cross row groups and files)."""
    from raylib.jobs.prepare import PrepareConfig, prepare
    from raylib.train_data import PreparedData
    from raylib.train_config import ModelSection

    table = synthetic_pairs(240, {"web/en": 2.0, "news/de": 1.0, "wiki": 1.0}, seed=7)
    table = table.set_column(4, "language", pa.array([lang or None for lang in table.column("language").to_pylist()]))
    layouts = {"a": [table.slice(0, 100), table.slice(100)],
               "b": [table.take(np.random.default_rng(1).permutation(240)[i::5]) for i in range(5)]}
    manifests = {}
    for name, parts in layouts.items():
        (tmp_path / name).mkdir()
        for i, part in enumerate(parts):
            pq.write_table(part, tmp_path / name / f"part{i}.parquet")
        cfg = PrepareConfig(input=[str(tmp_path / name)], output=str(tmp_path / f"out_{name}"),
                            model=ModelSection(name_or_path="tiny", tiny=TINY), query_max_length=8,
                            document_max_length=12, seed=3, row_group_rows=5, read_blocks=2,
                            partition_mib=0.004 if name == "a" else 256,  # a: several key ranges
                            row_groups_per_file=3 if name == "a" else 512)  # a: files of 15 rows
        manifests[name] = prepare(cfg)
    assert manifests["a"]["partitions"] > 1 == manifests["b"]["partitions"]
    assert all(f["rows"] <= 15 for v in manifests["a"]["sources"].values() for f in v["files"])
    assert {s: v["rows"] for s, v in manifests["a"]["sources"].items()} == \
           {s: v["rows"] for s, v in manifests["b"]["sources"].items()}
    reference = _reference_steps(table, seed=3, batch=8, workers=2, epochs=2)
    for name, m in manifests.items():
        data = PreparedData.open(m["location"])
        plan = make_plan(data.source_rows, 8, 2, 3, 2)
        assert plan.total_steps == len(reference)
        for rank in range(2):
            got = [(step, rows["id"]) for step, rows, _ in iter_prepared_steps(plan, data, 0, rank, 2)]
            assert got == [(t, reference[t][rank]) for t in range(len(reference))], name
            # resuming at step k reads exactly the tail
            tail = [(step, rows["id"]) for step, rows, _ in iter_prepared_steps(plan, data, 11, rank, 1)]
            assert tail == got[11:]
    again = prepare(PrepareConfig(**{**cfg.__dict__}))
    assert again["reused"]


def test_tiny_tokenizer_without_weights_equals_the_tiny_encoders():
    """Prepare tasks tokenize for a tiny model without building it: same ids, same settings."""
    from raylib.prepare import load_text_tokenizer, tokenizer_identity
    from raylib.tiny import tiny_encoder

    for kw in (dict(hidden_size=32, num_layers=2, max_length=64, m3_heads=True),
               dict(arch="xlm-roberta", pooling="mean", max_length=32, query_prefix="query: ")):
        fast = load_text_tokenizer("tiny", tuple(kw.items()))
        slow = tiny_encoder(**kw).text_tokenizer
        assert fast.settings == slow.settings and tokenizer_identity(fast) == tokenizer_identity(slow)
        texts = ["The protein of cells, in 2024!", "a query about rivers " * 20]
        for kind in ("query", "document"):
            a, b = fast(texts, kind), slow(texts, kind)
            assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), (kw, kind)
