"""Prepare training data: a Ray Data job that turns pairs (pretraining) or mined rows (finetuning)
into per-source, pre-tokenized Parquet shards in a seeded, layout-independent order + a manifest.

  python jobs/prepare.py --config jobs/configs/prepare/debug.yaml [--set input=[s3://b/pairs/] ...]
  ray job submit --working-dir . -- python jobs/prepare.py --config jobs/configs/prepare/h100.yaml

Reads Parquet/JSONL (local or s3://), splits rows by source x language (+ `#len<=B` length buckets,
M3 §3.4), tokenizes queries and documents with the model's tokenizer (prefixes, max lengths) in
map_batches tasks and writes `<output>/shards/<source>/part-*.parquet` (row groups of
`row_group_rows`) and `<output>/manifest.json` (rows per source and file, tokenizer identity, max
lengths, seed). Train workers (raylib.train_data.PreparedData) read their rows of each step
straight from the shards. pretrain/finetune run this stage themselves when `data.prepared` is empty
(into `<checkpoint.storage_path>/<checkpoint.name>/prepared`) and reuse a matching manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from raylib.config import parse_job_args
from raylib.jobs.summary import config_errors_exit
from raylib.train_config import ModelSection

if TYPE_CHECKING:
    from raylib.prepare import PrepareSpec

MANIFEST = "manifest.json"


@dataclass
class PrepareConfig:
    """Input pairs, the tokenizer's model and lengths, bucketing, shard layout, Ray."""

    input: list[str] = field(default_factory=list)
    output: str = "runs/prepared/debug"
    kind: str = "pairs"              # pairs: query, document; mined: query, positive, negatives (mine job)
    model: ModelSection = field(default_factory=ModelSection)  # whose tokenizer (name/dir or tiny)
    query_max_length: int = 32
    document_max_length: int = 256
    num_negatives: int = 0           # mined: negatives that count for a row's length (bucketing)
    length_bounds: list[int] = field(default_factory=list)     # M3 §3.4 buckets (empty: none)
    seed: int = 0                    # the within-source order
    row_group_rows: int = 1024       # a worker's rows of a step span about one row group
    row_groups_per_file: int = 512   # bounds each file's footer, hence a reader's memory per open file
    partition_mib: float = 256         # input MiB per key range: bounds one write task's memory
    read_blocks: int = 0             # read parallelism cap (0: Ray's choice)
    reuse: bool = True               # keep an existing manifest made with the same settings
    ray_num_cpus: int = 8
    ray_address: str = ""


def spec_of(cfg: PrepareConfig, input_bytes: int) -> Any:
    """The PrepareSpec the tasks get (partitions from the input size: file size only)."""
    from raylib.prepare import PrepareSpec, partitions_for

    return PrepareSpec(cfg.kind, cfg.model.name_or_path, tuple(sorted(cfg.model.tiny.items())),
                       cfg.query_max_length, cfg.document_max_length, cfg.num_negatives,
                       tuple(cfg.length_bounds), cfg.seed, partitions_for(input_bytes, cfg.partition_mib),
                       cfg.row_group_rows, cfg.row_groups_per_file)


def input_files(inputs: Sequence[str]) -> list[list]:
    """[path, bytes, mtime] of every input file (a listing, no reads): the input's identity for
    reusing a manifest, and its size for the partition count."""
    from raylib.storage import list_data_files

    fs, parquet, jsonl = list_data_files(list(inputs))
    return [[i.path, i.size or 0, str(i.mtime) if i.mtime else None] for i in fs.get_file_info(parquet + jsonl)]


def absolute(path: str) -> str:
    """s3:// as it is; a local path made absolute here (tasks and workers run in other directories)."""
    from raylib.storage import filesystem_for, is_s3

    return path if is_s3(path) else filesystem_for(path)[1]


def settings_key(manifest: dict) -> dict:
    """What must match for a manifest to be reused (settings, tokenizer, input files with sizes
    and modification times; not counts, layout or timings)."""
    skip = {"rows", "rejected", "sources", "seconds", "partitions", "pairs_per_s", "columns"}
    return {k: v for k, v in manifest.items() if k not in skip}


def run_pipeline(inputs: Sequence[str], output: str, spec: "PrepareSpec",
                 read_blocks: int | None = None) -> list[dict]:
    """The distributed part: read, prepare, group, write; returns the per-file metadata rows."""
    from raylib.prepare import prepare_batch, write_group
    from raylib.ray_data.io import read_table
    from raylib.reader import ROWS_PER_BATCH
    from raylib.storage import filesystem_for

    ds = read_table(list(inputs), override_num_blocks=read_blocks or None)
    ds = ds.map_batches(prepare_batch, fn_args=(spec,), batch_format="pyarrow", zero_copy_batch=True,
                        batch_size=ROWS_PER_BATCH)
    # one shuffle partition per key range: a reduce task then holds about partition_mib of rows
    fs, root = filesystem_for(output)
    meta = ds.groupby(["source", "part"], num_partitions=spec.partitions).map_groups(
        write_group, fn_args=(fs, root, spec.row_group_rows, spec.row_groups_per_file), batch_format="pyarrow")
    return meta.take_all()


def prepare(cfg: PrepareConfig) -> dict:
    """Run the stage (or reuse a matching manifest); returns the manifest with `location`."""
    from raylib.ray_env import init_data_ray
    from raylib.prepare import build_manifest, load_text_tokenizer, tokenizer_identity
    from raylib.storage import exists, filesystem_for, join, read_text, write_text

    if not cfg.input:
        raise ValueError("input is empty: nothing to prepare")
    cfg.output = absolute(cfg.output)
    if cfg.kind == "mined" and cfg.length_bounds and cfg.num_negatives < 0:
        raise ValueError("num_negatives must be >= 0")
    files = input_files(cfg.input)
    spec = spec_of(cfg, sum(f[1] for f in files))
    identity = tokenizer_identity(load_text_tokenizer(spec.model, spec.tiny))
    extra = {"input": list(cfg.input), "input_files": files, "tokenizer": identity}
    wanted = settings_key(build_manifest([], spec, extra))
    path = join(cfg.output, MANIFEST)
    if cfg.reuse and exists(path):
        old = json.loads(read_text(path))
        if settings_key(old) == wanted:
            return {**old, "location": cfg.output, "reused": True}
    init_data_ray(cfg.ray_num_cpus, address=cfg.ray_address or None)
    fs, root = filesystem_for(cfg.output)
    if exists(join(cfg.output, "shards")):
        fs.delete_dir_contents(join(root, "shards"))
    start = time.time()
    meta = run_pipeline(cfg.input, cfg.output, spec, cfg.read_blocks or None)
    seconds = time.time() - start
    manifest = build_manifest(meta, spec, extra)
    if manifest["rows"] == 0:
        raise ValueError(f"no usable rows in {cfg.input} (kind {cfg.kind}): rejected {manifest['rejected']}")
    manifest.update(seconds=round(seconds, 2), pairs_per_s=round(manifest["rows"] / max(seconds, 1e-9), 1))
    write_text(path, json.dumps(manifest))  # written last: its presence means the shards are complete
    return {**manifest, "location": cfg.output, "reused": False}


def prepare_for_training(cfg: Any, objective: Any) -> dict:
    """The prepare stage of a training job (pretrain/finetune config): pairs or mined rows by the
    objective, its max lengths, data.length_bounds; into data.prepared or <run output>/prepared."""
    from raylib.storage import join

    mined = hasattr(objective, "num_negatives")
    d = cfg.data
    if d.format not in ("parquet", "json"):
        raise ValueError(f"data.format must be parquet or json, got {d.format!r}")
    output = absolute(d.prepared or join(cfg.checkpoint.storage_path, cfg.checkpoint.name, "prepared"))
    if not d.paths:
        if d.prepared:  # an already prepared location, no raw input given
            from raylib.train_data import PreparedData

            return {**PreparedData.open(output).manifest, "location": output, "reused": True}
        raise ValueError("data.paths is empty")
    pcfg = PrepareConfig(input=list(d.paths), output=output, kind="mined" if mined else "pairs",
                         model=cfg.model, query_max_length=objective.query_max_length,
                         document_max_length=objective.document_max_length,
                         num_negatives=getattr(objective, "num_negatives", 0),
                         length_bounds=list(d.length_bounds), seed=d.seed,
                         row_group_rows=d.row_group_rows, partition_mib=d.partition_mib,
                         ray_num_cpus=cfg.scaling.ray_num_cpus, ray_address=cfg.scaling.ray_address)
    return prepare(pcfg)


def run(cfg: PrepareConfig) -> dict:
    """Prepare; writes summary.json beside the manifest, reports, returns the summary."""
    from raylib.jobs.summary import finish, seconds

    m = prepare(cfg)
    summary = {"output": cfg.output, "manifest": f"{cfg.output.rstrip('/')}/{MANIFEST}", "reused": m["reused"],
               "rows": m["rows"], "rejected": m["rejected"], "partitions": m["partitions"],
               "source_rows": {s: v["rows"] for s, v in m["sources"].items()},
               "files": sum(len(v["files"]) for v in m["sources"].values()),
               "seconds": m.get("seconds"), "pairs_per_s": m.get("pairs_per_s"), "tokenizer": m["tokenizer"]}
    lines = [f"{m['rows']} rows in {len(m['sources'])} source(s), {summary['files']} shard(s); "
             f"rejected {sum(m['rejected'].values())}" + (" (reused)" if m["reused"] else
                                                          f"; {seconds(m['seconds'])}, {m['pairs_per_s']} pairs/s")]
    return finish("prepare", summary, cfg.output, lines)


def main(argv: Sequence[str] | None = None) -> dict:
    return config_errors_exit(run, parse_job_args(PrepareConfig, __doc__.split("\n")[0], argv))


if __name__ == "__main__":
    main()
