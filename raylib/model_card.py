"""The model card (README.md) written into every checkpoint and the final model: sentence-transformers'
front-matter conventions (YAML: tags, library_name, pipeline_tag, base_model, datasets, metrics,
model-index), then what it is, the recipe (Arctic-Embed 2.0 / BGE-M3 heads), the data manifest
counts, the Matryoshka dims, the evaluation table of the run and how to load it. No Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import yaml

CARD_FILE = "README.md"


@dataclass
class CardInfo:
    """Everything a card says; the loop fills it from the config, the manifest and the metrics."""

    name: str
    job: str                                  # pretrain | finetune
    base_model: str
    recipe: str                               # one paragraph
    objective: dict
    settings: dict                            # EncoderSettings (pooling, prefixes, dims)
    dim: int
    heads: list[str]                          # dense (+ sparse, multivector)
    data: dict                                # manifest counts: sources {name: rows}, rows, rejected, input
    hyperparameters: dict
    step: int = 0
    total_steps: int = 0
    evaluations: list[dict] = field(default_factory=list)  # metric rows with eval/... keys
    best: dict | None = None                  # {"step", "score", "metric"}
    eval_set: str = ""
    tracking: str = ""                        # MLflow run URL / store
    extra: list[tuple[str, str]] = field(default_factory=list)  # (title, markdown) sections


def recipe_of(job: str, objective: Any) -> str:
    """One paragraph naming the paper recipe the objective implements."""
    o = asdict(objective) if hasattr(objective, "__dataclass_fields__") else dict(objective)
    mrl = f" Matryoshka (Arctic-Embed 2.0 §2.5) at dims {o['matryoshka_dims']}." if o.get("matryoshka_dims") else ""
    if job == "pretrain" or "num_negatives" not in o:  # pairs, not mined rows (objectives.base)
        return (f"Arctic-Embed 2.0 contrastive pretraining (App. C): InfoNCE (temperature {o['temperature']}) of "
                f"each query against the in-batch documents gathered from every worker, one source per batch."
                + mrl)
    if o.get("mode") == "m3":
        return (f"BGE-M3 unified finetuning (M3 §3.2-3.3): dense, sparse (lexical) and multi-vector heads "
                f"trained together with self-knowledge distillation; 1 positive + {o['num_negatives']} mined "
                f"hard negatives per query, {o['negatives']} negatives, temperature {o['temperature']}." + mrl)
    distill = f" Teacher-score distillation weight {o['distill_weight']}." if o.get("distill_weight") else ""
    return (f"Arctic-Embed 2.0 finetuning (App. C): InfoNCE (temperature {o['temperature']}) over 1 positive + "
            f"{o['num_negatives']} mined hard negatives per query ({o['negatives']} negatives)." + mrl + distill)


def manifest_counts(manifest: dict) -> dict:
    """The data manifest's counts: rows per source, total rows, rejected rows by reason, inputs."""
    return {"sources": {s: int(v["rows"]) for s, v in manifest.get("sources", {}).items()},
            "rows": int(manifest.get("rows", 0)), "rejected": dict(manifest.get("rejected", {})),
            "input": list(manifest.get("input", []))}


def _dims(info: CardInfo) -> list[int]:
    """The Matryoshka dims the model was trained for (saved settings, else the objective's)."""
    return list(info.settings.get("matryoshka_dims") or info.objective.get("matryoshka_dims") or [])


def _front_matter(info: CardInfo) -> str:
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "dense", "raylib",
            "generated_from_trainer", f"dataset_size:{info.data.get('rows', 0)}", "loss:InfoNCE"]
    if "sparse" in info.heads:
        tags += ["sparse", "multi-vector", "bge-m3"]
    if _dims(info):
        tags.append("loss:MatryoshkaLoss")
    meta: dict[str, Any] = {"tags": tags, "library_name": "sentence-transformers",
                            "pipeline_tag": "sentence-similarity"}
    if info.base_model and info.base_model != "tiny":
        meta["base_model"] = info.base_model
    meta["datasets"] = sorted(info.data.get("sources", {}))
    meta["metrics"] = ["ndcg_at_10", "recall_at_100"]
    last = info.evaluations[-1] if info.evaluations else None
    if last:
        results = [{"type": k.split("/", 1)[1].replace("@", "_at_"), "value": v, "name": k}
                   for k, v in last.items() if k.startswith("eval/")]
        meta["model-index"] = [{"name": info.name, "results": [{
            "task": {"type": "information-retrieval", "name": "Information Retrieval"},
            "dataset": {"name": info.eval_set or "held-out", "type": info.eval_set or "held-out"},
            "metrics": results}]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _eval_table(info: CardInfo) -> list[str]:
    if not info.evaluations:
        return ["No evaluation during training (set the job's `eval:` section)."]
    keys = sorted({k for r in info.evaluations for k in r if k.startswith("eval/")})
    lines = [f"Evaluated on {info.eval_set or 'held-out data'} during training; "
             + (f"best `{info.best['metric']}` {info.best['score']:.4f} at step {info.best['step']}."
                if info.best else ""), "",
             "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for r in info.evaluations:
        mark = " (best)" if info.best and r["step"] == info.best["step"] else ""
        lines.append(f"| {r['step']}{mark} | " + " | ".join(f"{r[k]:.4f}" if k in r else "" for k in keys) + " |")
    return lines


def _usage(info: CardInfo) -> list[str]:
    s = info.settings
    q, d = s.get("query_prefix", ""), s.get("document_prefix", "")
    dim = (s.get("matryoshka_dims") or [info.dim])[0]
    flag = ("from FlagEmbedding import BGEM3FlagModel\nmodel = BGEM3FlagModel(\"PATH\", use_fp16=False)\n"
            "out = model.encode([\"a query\"], return_dense=True, return_sparse=True, return_colbert_vecs=True)"
            if "sparse" in info.heads else
            f"from FlagEmbedding import FlagModel\nmodel = FlagModel(\"PATH\", query_instruction_for_retrieval={q!r},"
            f"\n                  pooling_method={s.get('pooling', 'cls')!r}, use_fp16=False)\n"
            "q = model.encode_queries([\"a query\"]); p = model.encode_corpus([\"a passage\"])")
    return ["### sentence-transformers", "```python", "from sentence_transformers import SentenceTransformer",
            "model = SentenceTransformer(\"PATH\")" + (f"  # truncate_dim={dim} for Matryoshka" if s.get("matryoshka_dims") else ""),
            f"q = model.encode([{(q + 'a query')!r}]); d = model.encode([{(d + 'a passage')!r}])", "```",
            "### FlagEmbedding", "```python", flag, "```",
            "### raylib.Encoder", "```python", "from raylib import Encoder",
            "encoder = Encoder.from_pretrained(\"PATH\")  # prefixes from raylib_settings.json",
            "q = encoder.encode([\"a query\"], \"query\"" + (", sparse=True, multivector=True" if "sparse" in info.heads else "")
            + (f", dim={dim}" if s.get("matryoshka_dims") else "") + ")", "```",
            "### Ray Serve (serve/config.yaml)", "```yaml", "applications:", "  - name: raylib-embed",
            "    import_path: raylib.ray_serve.app:app", "    args:", "      model: PATH", "```",
            "`PATH` is this directory (a local copy of it when it lives on s3://)."]


def render_card(info: CardInfo) -> str:
    """The card's markdown (front matter + sections)."""
    data, hp = info.data, info.hyperparameters
    rejected = sum(data.get("rejected", {}).values())
    lines = [f"# {info.name}", "",
             f"A {info.dim}-d multilingual text-embedding model ({', '.join(info.heads)} "
             f"head{'s' if len(info.heads) > 1 else ''}) trained with raylib-embed's {info.job} job"
             f" from `{info.base_model}`: step {info.step} of {info.total_steps}.", "",
             "## Recipe", "", info.recipe, "",
             "## Training data", "",
             f"{data.get('rows', 0):,} rows from {len(data.get('sources', {}))} source(s) after the prepare "
             f"stage; {rejected:,} rejected" + (f" ({', '.join(f'{k}: {v}' for k, v in data['rejected'].items())})"
                                                if rejected else "") + ".", "",
             "| source | rows |", "|---|---|"]
    lines += [f"| {s} | {n:,} |" for s, n in data.get("sources", {}).items()]
    if data.get("input"):
        lines += ["", "Input: " + ", ".join(f"`{p}`" for p in data["input"])]
    dims = _dims(info)
    lines += ["", "## Model", "",
              f"- embedding dim {info.dim}; Matryoshka dims trained for: {dims or 'none (full dim only)'}",
              f"- pooling {info.settings.get('pooling')}, normalized {info.settings.get('normalize')}, "
              f"max length {info.settings.get('max_length')}",
              f"- query prefix {info.settings.get('query_prefix', '')!r}, document prefix "
              f"{info.settings.get('document_prefix', '')!r}", "",
              "## Hyperparameters", "", "| name | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hp.items()]
    lines += ["", "## Evaluation", "", *_eval_table(info)]
    for title, body in info.extra:
        lines += ["", f"## {title}", "", body]
    if info.tracking:
        lines += ["", "## Tracking", "", f"MLflow run: {info.tracking}"]
    lines += ["", "## How to load", "", *_usage(info), ""]
    return _front_matter(info) + "\n" + "\n".join(lines)


def write_card(directory: str, text: str) -> str:
    """Write README.md into a model directory (local or s3://); returns its path."""
    from raylib.storage import join, write_text

    path = join(directory, CARD_FILE)
    write_text(path, text)
    return path


def add_section(directory: str, title: str, body: str) -> str:
    """Append (or replace) a `## title` section in a model directory's card, before `## How to load`;
    an unchanged card is not rewritten (a resumed pipeline leaves its outputs as they were)."""
    from raylib.storage import join, read_text

    text = original = read_text(join(directory, CARD_FILE))
    head = f"\n## {title}\n"
    if head in text:  # replace an earlier version of the section
        start = text.index(head)
        end = text.find("\n## ", start + len(head))
        text = text[:start] + (text[end:] if end >= 0 else "\n")
    cut = text.find("\n## How to load")
    section = f"{head}\n{body}\n"
    text = text[:cut] + section + text[cut:] if cut >= 0 else text + section
    return join(directory, CARD_FILE) if text == original else write_card(directory, text)


INFO_FILE = "raylib_card.json"  # the CardInfo beside README.md: the driver re-renders the final card


def training_card_info(cfg: Any, job: str, objective: Any, manifest: dict, settings: Any, dim: int,
                       heads: list[str], step: int, total_steps: int) -> CardInfo:
    """A training job's CardInfo from its config (TrainJobConfig), the prepare manifest and the model."""
    base = cfg.model.name_or_path
    base = getattr(base, "name_or_path", base)
    t, d = cfg.train, cfg.data
    hp = {"learning rate": t.lr, "schedule": f"WSD (warmup {t.warmup}, decay {t.decay}, min ratio {t.min_lr_ratio})",
          "weight decay": t.weight_decay, "global batch size": d.global_batch_size, "epochs": d.epochs,
          "steps": total_steps, "workers": cfg.scaling.num_workers, "gradient cache chunk": t.grad_cache_chunk,
          "bf16": t.bf16, "query / document max length":
              f"{objective.query_max_length} / {objective.document_max_length}", "seed": t.seed}
    e = cfg.eval
    eval_set = (f"{e.data} ({e.split})" if e.data else f"{e.holdout:.1%} of the training rows held out") if e.enabled else ""
    return CardInfo(name=cfg.checkpoint.name, job=job, base_model=str(base), recipe=recipe_of(job, objective),
                    objective=asdict(objective), settings=asdict(settings), dim=int(dim), heads=list(heads),
                    data=manifest_counts(manifest), hyperparameters=hp, step=step, total_steps=total_steps,
                    eval_set=eval_set)


def write_training_card(directory: str, info: CardInfo) -> str:
    """README.md + raylib_card.json into a (checkpoint) directory, local or s3://."""
    import json

    from raylib.storage import join, write_text

    write_text(join(directory, INFO_FILE), json.dumps(asdict(info), default=str))
    return write_card(directory, render_card(info))


def read_card_info(directory: str) -> CardInfo:
    """The CardInfo a checkpoint carries."""
    import json

    from raylib.storage import join, read_text

    data = json.loads(read_text(join(directory, INFO_FILE)))
    data["extra"] = [tuple(x) for x in data.get("extra", [])]
    return CardInfo(**data)
