"""Experiment tracking of a training run: MLflow (a file store, sqlite or a team's server) and
TensorBoard event files. No Ray: the loop's rank 0 logs each step's metrics live into the run the
driver opened (`MlflowRun`); the driver logs the resolved config as params at the start and the
curves, summary and model card as artifacts at the end; TensorBoard files are written from
metrics.jsonl into the run's storage (`write_tensorboard`).

MLflow metric keys allow letters, digits, `_ - . / : ` and space: `loss@256` is logged as
`loss_at_256`, `eval/dense/ndcg@10` as `eval/dense/ndcg_at_10` (`metric_key`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NON_METRICS = ("step", "time")  # record fields that are not metrics


@dataclass
class MlflowSection:
    """An MLflow run per training job."""

    enabled: bool = False
    tracking_uri: str = ""      # "" : $MLFLOW_TRACKING_URI, else a file store <storage_path>/mlruns
    experiment: str = "raylib"
    run_name: str = ""          # "" : checkpoint.name


@dataclass
class TensorboardSection:
    """TensorBoard event files of every logged metric."""

    enabled: bool = False
    log_dir: str = ""           # "" : <run output>/tensorboard (local or s3://)


@dataclass
class TrackingSection:
    mlflow: MlflowSection = field(default_factory=MlflowSection)
    tensorboard: TensorboardSection = field(default_factory=TensorboardSection)


def metric_key(name: str) -> str:
    """A metric name MLflow accepts (`@` -> `_at_`, other odd characters -> `_`)."""
    return re.sub(r"[^\w\-./: ]", "_", name.replace("@", "_at_"))


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config dict -> {"train.lr": "1e-05", ...}: every leaf, as MLflow params."""
    out: dict[str, str] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = json.dumps(v, default=str) if isinstance(v, (list, dict)) else str(v)
    return {k: v[:6000] for k, v in out.items()}  # MLflow's param value limit


def resolve_uri(section: MlflowSection, storage_path: str) -> str:
    """The tracking URI: the config's, $MLFLOW_TRACKING_URI, or a file store beside the runs."""
    uri = section.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if uri:
        return uri if "://" in uri or uri.startswith("file:") else Path(uri).expanduser().resolve().as_uri()
    if "://" in storage_path:
        raise ValueError("tracking.mlflow.tracking_uri (or $MLFLOW_TRACKING_URI) is needed when "
                         f"checkpoint.storage_path is remote ({storage_path}): point it at the team's server")
    return (Path(storage_path).expanduser().resolve() / "mlruns").as_uri()


def _client(uri: str):
    if uri.startswith("file:"):  # MLflow 3.x refuses new file stores unless told (it prefers sqlite)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


@dataclass
class MlflowRun:
    """A handle on one MLflow run (picklable: the driver opens it, rank 0 logs into it)."""

    uri: str
    run_id: str
    experiment_id: str

    @classmethod
    def start(cls, section: MlflowSection, uri: str, run_name: str, config: dict,
              tags: dict[str, str] | None = None) -> "MlflowRun":
        """Create the experiment if needed and a run with the flattened config as params."""
        from mlflow.entities import Param

        client = _client(uri)
        experiment = client.get_experiment_by_name(section.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(section.experiment)
        run = client.create_run(experiment_id, run_name=section.run_name or run_name, tags=tags or {})
        params = [Param(k, v) for k, v in flat_params(config).items()]
        for start in range(0, len(params), 100):  # log_batch takes at most 100 params
            client.log_batch(run.info.run_id, params=params[start:start + 100])
        return cls(uri, run.info.run_id, experiment_id)

    @property
    def url(self) -> str:
        """The run's page on a server, or its store location."""
        if self.uri.startswith("http"):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"{self.uri} (experiment {self.experiment_id}, run {self.run_id})"

    def log_record(self, record: dict) -> None:
        """One metrics.jsonl record: every numeric field at its step."""
        from mlflow.entities import Metric

        step, ts = int(record["step"]), int(record.get("time", time.time()) * 1000)
        metrics = [Metric(metric_key(k), float(v), ts, step) for k, v in record.items()
                   if k not in NON_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        _client(self.uri).log_batch(self.run_id, metrics=metrics)

    def finish(self, artifacts: dict[str, bytes | str], tags: dict[str, str] | None = None,
               status: str = "FINISHED") -> None:
        """Log artifacts ({name: content}), tags, and end the run."""
        client = _client(self.uri)
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in artifacts.items():
                path = Path(tmp) / name
                path.write_bytes(content if isinstance(content, bytes) else content.encode())
                client.log_artifact(self.run_id, str(path))
        for k, v in (tags or {}).items():
            client.set_tag(self.run_id, k, v)
        client.set_terminated(self.run_id, status)


class LiveLogger:
    """Rank 0's per-step logging into an MlflowRun; a tracking failure warns once, never stops training."""

    def __init__(self, run: MlflowRun | None):
        self.run = run

    def __call__(self, record: dict) -> None:
        if self.run is None:
            return
        try:
            self.run.log_record(record)
        except Exception as e:  # noqa: BLE001 - tracking is best effort; training goes on
            print(f"[tracking] MLflow logging stopped: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            self.run = None


def write_tensorboard(rows: list[dict], log_dir: str) -> str:
    """Every numeric metric of metrics.jsonl rows as TensorBoard scalars (tag = metric name) under
    `log_dir` (local or s3://: written locally, then copied); returns log_dir."""
    from torch.utils.tensorboard import SummaryWriter

    from raylib.storage import copy_tree, is_s3

    def write(directory: str) -> None:
        writer = SummaryWriter(log_dir=directory)
        for r in rows:
            for k, v in r.items():
                if k not in NON_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(k, float(v), int(r["step"]), walltime=r.get("time"))
        writer.close()

    if not is_s3(log_dir):
        write(log_dir)
        return log_dir
    with tempfile.TemporaryDirectory() as tmp:
        write(tmp)
        copy_tree(tmp, log_dir)
    return log_dir


def read_tensorboard(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the scalars in a local event file dir (TensorBoard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def open_run(section: TrackingSection, storage_path: str, run_name: str, config: dict) -> MlflowRun | None:
    """The job's MLflow run when tracking.mlflow is on (params logged), else None."""
    if not section.mlflow.enabled:
        return None
    uri = resolve_uri(section.mlflow, storage_path)
    return MlflowRun.start(section.mlflow, uri, run_name, config, tags={"raylib.job": run_name})


def summarize(run: MlflowRun | None, tensorboard: str | None) -> dict[str, Any]:
    """What the job summary says about tracking."""
    out: dict[str, Any] = {}
    if run is not None:
        out["mlflow"] = {"tracking_uri": run.uri, "experiment_id": run.experiment_id, "run_id": run.run_id,
                         "url": run.url}
    if tensorboard:
        out["tensorboard"] = tensorboard
    return out
