"""The pipeline on a multi-node Ray with no shared disk: a head with 0 CPUs and two 4-CPU worker
nodes (`ray start --block` processes, each with its own temp dir and ports), every path on s3://
(a moto server this module starts), the driver in an empty directory. Checks that every stage's
summary and output land in the bucket, that the finetune stage's run reaches a real `mlflow server`
(config, loss per step, evaluation during training: the tracking server a team without a shared
disk runs) and the model card in the bucket gets the before/after table, that a second run
resumes from the markers in the bucket, and that `serve deploy` of a config pointing at the
finetuned checkpoint (s3://) answers /v1/embeddings. Only the processes started here are stopped
(never `ray stop`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from raylib.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow

WORKER_CPUS = 4  # per worker node; finetune asks for all of them per train worker (one per node)
# Tiny-model settings for the debug pipeline (the random tiny model ranks at random: mining takes a
# rank window instead of TopK-PercPos, which would drop every query).
STAGE_SETS = {
    "filter.set": ["input={pairs}", "model={curation_model}", "shard_size=100000", "top_k=100",
                   "document_max_tokens=64"],
    "mine.set": ["input.path={filtered}", "teacher={curation_model}", "num_negatives=1", "candidates=10",
                 "strategy=rank_window", "range_max=10"],
    "finetune.set": ["model.name_or_path={base}", "data.paths=[{mined}]", "objective.mode=dense",
                     "objective.matryoshka_dims=[]", "objective.document_max_length=64",
                     "objective.num_negatives=1", "objective.distill_weight=0", "objective.negatives=hard",
                     "train.max_steps=4", "data.global_batch_size=8", "checkpoint.every_steps=4",
                     "scaling.num_workers=2", f"scaling.cpus_per_worker={WORKER_CPUS}",
                     "eval.every_n_steps=2", "eval.holdout=0.1", "tracking.mlflow.enabled=true"],
}



def get_json(url: str, timeout: float = 10) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until(check, what: str, timeout_s: float, procs: tuple = ()) -> object:
    """Poll `check()` until it returns something truthy (errors count as not yet)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, f"{p.args[:3]} exited with {p.returncode} while waiting for {what}"
        with contextlib.suppress(OSError, ValueError, KeyError):
            value = check()
            if value:
                return value
        time.sleep(2)
    raise TimeoutError(f"{what}: not after {timeout_s} s")


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server; this process's AWS_* point at it (the nodes' environments do not)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
    bucket = f"multinode-{uuid.uuid4().hex[:8]}"  # unique: no model cache keyed by a reused URI
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
        yield {"env": env, "bucket": bucket}
    server.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 (a file store behind it): where the nodes' runs go."""
    store = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    env = {**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"}
    with open(store / "server.log", "w") as log:
        server = subprocess.Popen([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1", "--backend-store-uri", (store / "store").as_uri(),
                                   "--default-artifact-root", (store / "artifacts").as_uri()],
                                  env=env, stdout=subprocess.DEVNULL, stderr=log)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200,
                   "mlflow server", 120, (server,))
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def ray_start(args: list[str], env: dict, temp_dir: str) -> subprocess.Popen:
    """One `ray start --block` node in its own process group, with its own ports and temp dir
    (the defaults may be held by other Rays on this host); SIGTERM to the group stops it."""
    cmd = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}",
           "--node-ip-address=127.0.0.1", "--object-store-memory=200000000",
           "--min-worker-port=0", "--max-worker-port=0",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", *args]
    log = open(Path(temp_dir) / "ray_start.log", "w")
    return subprocess.Popen(cmd, env=env, cwd=temp_dir, start_new_session=True, stdout=log,
                            stderr=subprocess.STDOUT)


def stop(procs: list[subprocess.Popen], grace_s: float = 3) -> None:
    """SIGTERM to every node's process group at once (raylet, agents, workers), SIGKILL to what
    still runs after `grace_s`; then whatever they started outside their groups (Serve's
    HAProxy: it outlives a killed Ray). All at once: the nodes' shutdowns overlap."""
    import psutil

    descendants: list = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            descendants += psutil.Process(proc.pid).children(recursive=True)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    for child in descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPUs: nothing runs there but Ray's own services and the drivers' connections) and
    two worker nodes, each with its own temp dir; the nodes see no AWS_* or RAYLIB_CACHE (what a
    job needs travels with it: raylib.ray_env forwards the driver's)."""
    env = {k: v for k, v in os.environ.items()
           if k != "RAY_ADDRESS" and not k.startswith("AWS_") and k != "RAYLIB_CACHE"}
    env.update(RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    temp_dirs = [tempfile.mkdtemp(prefix=f"rmn{i}", dir="/tmp") for i in range(3)]  # short socket paths
    gcs, dash = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        procs.append(ray_start(["--head", f"--port={gcs}", "--num-cpus=0", "--dashboard-host=127.0.0.1",
                                f"--dashboard-port={dash}", f"--ray-client-server-port={free_port()}"],
                               env, temp_dirs[0]))
        url = f"http://127.0.0.1:{dash}"
        wait_until(lambda: get_json(f"{url}/api/version"), "the head's dashboard", 300, tuple(procs))
        for temp_dir in temp_dirs[1:]:
            procs.append(ray_start([f"--address=127.0.0.1:{gcs}", f"--num-cpus={WORKER_CPUS}"], env, temp_dir))

        def alive_nodes() -> list[dict]:
            nodes = get_json(f"{url}/api/v0/nodes?limit=100")["data"]["result"]["result"]
            alive = [n for n in nodes if n["state"] == "ALIVE"]
            return alive if len(alive) == 3 else []

        nodes = wait_until(alive_nodes, "three alive nodes", 300, tuple(procs))
        assert sorted(n["resources_total"].get("CPU", 0) for n in nodes) == [0, WORKER_CPUS, WORKER_CPUS]
        yield {"address": f"127.0.0.1:{gcs}", "dashboard": url, "env": env}
    finally:
        stop(list(reversed(procs)))
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def run_pipeline(cluster: dict, s3: dict, cwd: Path, cache: Path, mlflow: str, *sets: str) -> tuple[dict, str]:
    """`python jobs/pipeline.py` on the cluster (RAY_ADDRESS), the debug config, tiny settings;
    returns its summary and its report."""
    cmd = [sys.executable, str(ROOT / "jobs" / "pipeline.py"),
           "--config", str(ROOT / "jobs" / "configs" / "pipeline" / "debug.yaml")]
    for key, items in STAGE_SETS.items():
        items = items + [f"tracking.mlflow.tracking_uri={mlflow}"] if key == "finetune.set" else items
        cmd += ["--set", f"{key}={json.dumps(items)}"]
    for item in sets:
        cmd += ["--set", item]
    env = {**cluster["env"], **s3["env"], "RAY_ADDRESS": cluster["address"], "RAYLIB_CACHE": str(cache)}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    report = out.stderr[out.stderr.rfind("== pipeline =="):] if out.returncode == 0 else out.stderr[-6000:]
    print(report)  # the stages' times (pytest -s or -rP)
    assert out.returncode == 0, out.stdout[-3000:] + report
    return json.loads(out.stdout.strip().splitlines()[-1]), report


def check_tracking(mlflow: str, report: str, checkpoint: str, base: str) -> None:
    """The finetune stage's MLflow run, read back from the server, holds the config, each step's
    loss and the evaluation; the report links the run and the card; the card in the bucket has the
    pipeline's before/after table."""
    from mlflow.tracking import MlflowClient

    from raylib.storage import read_text

    assert f"finetune tracking: {mlflow}/#/experiments/" in report, report
    card_path = f"{checkpoint}/README.md"
    assert f"model card: {card_path}" in report, report
    client = MlflowClient(mlflow)  # not mlflow.set_tracking_uri: that outlives the test
    [run] = client.search_runs([client.get_experiment_by_name("raylib").experiment_id])
    params, metrics = run.data.params, run.data.metrics
    assert params["train.max_steps"] == "4" and params["eval.every_n_steps"] == "2"
    assert metrics["loss"] > 0 and 0 <= metrics["eval/dense/ndcg_at_10"] <= 1
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/dense/ndcg_at_10")] == [2, 4]
    card = read_text(card_path)
    assert "## Before / after (pipeline evaluation)" in card and f"base_model: {base}" in card, card[:2000]


def listing(uri: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of the files under an s3:// prefix."""
    import pyarrow.fs as pafs

    from raylib.storage import filesystem_for

    fs, inner = filesystem_for(uri)
    return {i.path[len(inner) + 1:]: (i.size, i.mtime_ns) for i in fs.get_file_info(
        pafs.FileSelector(inner, recursive=True)) if i.type == pafs.FileType.File}


def scratch_dir(location: str) -> Path:
    """Rank 0's node-local scratch dir of a training stage on s3:// (a temp dir, not the cwd)."""
    from raylib.training import run_dir
    from raylib.train_config import CheckpointSection, TrainJobConfig

    storage, name = location.rsplit("/", 1)
    return run_dir(TrainJobConfig(checkpoint=CheckpointSection(storage_path=storage, name=name)))


def serve_deploy(cluster: dict, s3: dict, model: str, cache: Path, tmp_path: Path) -> str:
    """`serve deploy` of serve/config.yaml with `model:` and the ports replaced; returns the base URL."""
    import yaml

    config = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    # HAProxy's admin listeners (9101, 8404 by default) may be held by another Serve on this host
    config["controller_options"]["runtime_env"]["env_vars"].update(
        RAY_SERVE_HAPROXY_METRICS_PORT=str(free_port()), RAY_SERVE_HAPROXY_STATS_PORT=str(free_port()))
    app = config["applications"][0]
    app["args"]["model"] = model
    # what a real cluster gets from its instance role; here the replicas must find moto
    app["runtime_env"]["env_vars"].update({**s3["env"], "RAYLIB_CACHE": str(cache)})
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    out = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", cluster["dashboard"]],
                         env=cluster["env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: get_json(f"{base}/v1/models")["data"], "the deployed app's /v1/models", 600)
    except TimeoutError:
        apps = get_json(f"{cluster['dashboard']}/api/serve/applications/")["applications"]
        raise AssertionError(json.dumps({k: v.get("deployments") for k, v in apps.items()})[-4000:]) from None
    return base


@pytest.mark.timeout(1800)  # about 4 min on a quiet 2-core host; far longer when it is shared
def test_pipeline_on_three_nodes_everything_on_s3(cluster, s3, mlflow_server, tmp_path):
    from raylib.model import Encoder
    from raylib.storage import copy_tree, read_text
    from raylib.tiny import save_tiny_encoder

    bucket = f"s3://{s3['bucket']}"
    model = f"{bucket}/models/tiny"
    copy_tree(str(save_tiny_encoder(tmp_path / "tiny")), model)
    run, driver, cache = f"{bucket}/run", tmp_path / "driver", tmp_path / "cache"
    driver.mkdir()
    sets = (f"workdir={run}", f"model={model}", "serve.enabled=false")
    first, report = run_pipeline(cluster, s3, driver, cache, mlflow_server, *sets)

    # every stage's summary and outputs are in the bucket; nothing on the driver's disk
    assert list(driver.iterdir()) == [], list(driver.iterdir())
    files = listing(run)
    for stage in ("filter", "mine", "checkpoints/finetune", "evaluate/before", "evaluate/after", ""):
        assert f"{stage}/summary.json".lstrip("/") in files, (stage, sorted(files))
    assert {f"stages/{s}.json" for s in ("filter", "mine", "finetune")} <= files.keys()
    assert any(f.startswith("filter/kept/") and f.endswith(".parquet") for f in files)
    assert any(f.startswith("mine/mined/") and f.endswith(".parquet") for f in files)
    assert json.loads(read_text(f"{run}/summary.json")) == first
    stages = first["stages"]
    assert set(stages) == {"data", "filter", "mine", "finetune"}
    assert stages["filter"]["kept"] > 0 and stages["mine"]["counts"]["kept"] > 0
    finetune = json.loads(read_text(f"{run}/checkpoints/finetune/summary.json"))
    checkpoint = finetune["checkpoint"]
    assert checkpoint.startswith(f"{run}/checkpoints/finetune/") and first["model"] == checkpoint
    assert finetune["metrics"]["step"] == 4 and finetune["plan"]["num_workers"] == 2
    assert finetune["curves"] == f"{run}/checkpoints/finetune/curves.png"
    assert {"metrics.jsonl", "curves.png"} <= {f.rsplit("/", 1)[-1] for f in files
                                               if f.startswith("checkpoints/finetune/")}
    # a checkpoint on s3:// is a loadable model dir plus the train state a resumed run reads
    assert {"config.json", "raylib_settings.json", "train_state.pt"} <= listing(checkpoint).keys()
    assert read_text(f"{run}/checkpoints/finetune/metrics.jsonl").count("\n") == 4  # a line a step
    for tag in ("before", "after"):
        assert 0 <= first["evaluate"][tag]["dense"]["ndcg@10"] <= 1
    check_tracking(mlflow_server, report, checkpoint, model)

    # a second run finds every stage's marker in the bucket and runs none of them: the bucket
    # changes in nothing but the pipeline's own summary (no stage log, output or summary rewritten)
    second, _ = run_pipeline(cluster, s3, driver, cache, mlflow_server, *sets)
    assert {name: s["skipped"] for name, s in second["stages"].items()} == \
        {"filter": True, "mine": True, "finetune": True}
    assert second["model"] == checkpoint and second["evaluate"] == first["evaluate"]
    after = listing(run)
    assert after.keys() == files.keys()
    assert {f for f in files if after[f] != files[f]} <= {"summary.json"}
    assert list(driver.iterdir()) == []
    shutil.rmtree(scratch_dir(f"{run}/checkpoints/finetune"), ignore_errors=True)

    # the finetuned checkpoint, deployed from its s3:// URI, answers an OpenAI-style request
    base = serve_deploy(cluster, s3, checkpoint, cache, tmp_path)
    served = get_json(f"{base}/v1/models")["data"][0]["id"]
    body = json.dumps({"input": ["How do I parse a JSON string?"], "model": served}).encode()
    request = urllib.request.Request(f"{base}/v1/embeddings", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        vector = json.loads(response.read())["data"][0]["embedding"]
    expected = Encoder.from_pretrained(checkpoint).encode_dense(["How do I parse a JSON string?"],
                                                                kind="document")[0]
    assert len(vector) == len(expected)
    assert max(abs(a - float(b)) for a, b in zip(vector, expected)) < 1e-3
