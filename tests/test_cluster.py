"""cluster/h100.yaml against Ray's own schema, our invariants, and the versions pyproject.toml pins.

What an offline check can say about `ray up cluster/h100.yaml`: the file is valid for Ray's launcher,
the image tag names the pinned Ray and a CUDA that matches the torch build it installs, every node
installs the project (so `raylib.ray_serve.app` imports there) with exactly one FAISS build, and GPU workers
get EFA. Whether the tags, the AMI and the EFA path exist and work needs a real `ray up`.
"""

import copy
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.aws.config import _configure_from_network_interfaces
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster" / "h100.yaml"
PYPROJECT = ROOT / "pyproject.toml"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"

IMAGE = re.compile(r"^rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>cu\d+|cpu)$")
TORCH_INSTALL = re.compile(
    r"pip install\s+torch==(?P<version>\S+)\s+--index-url\s+https://download\.pytorch\.org/whl/(?P<platform>cu\d+|cpu)\b")
PROJECT_INSTALL = re.compile(r"pip install\s+(?:-e\s+)?['\"]?\.(?:\[(?P<extras>[^\]]*)\])?['\"]?(?:\s|$)")
DLAMI_SSM = "resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
EFA_CARDS = {"p5.48xlarge": 32}


def load_pyproject(path: Path = PYPROJECT) -> dict:
    """pyproject.toml as a dict (the single source of the Ray, torch and FAISS pins)."""
    return tomllib.loads(path.read_text())


def pinned(pyproject: dict, name: str) -> str:
    """The exact version `name==X` in the core dependencies; ValueError when not pinned once."""
    pins = [str(r.specifier)[2:] for r in map(Requirement, pyproject["project"]["dependencies"])
            if r.name == name and str(r.specifier).startswith("==")]
    if len(pins) != 1:
        raise ValueError(f"pyproject.toml must pin {name}==X exactly once, found {pins}")
    return pins[0]


def faiss_dists(requirements: list[str]) -> list[str]:
    """Names of FAISS distributions (faiss-cpu, faiss-gpu, faiss-gpu-cu12, ...) in a requirement list."""
    return [Requirement(r).name for r in requirements if Requirement(r).name.startswith("faiss")]


def node_images(config: dict) -> dict[str, str]:
    """Docker image each node type runs (node-type worker_image > head/worker_image > image)."""
    docker = config.get("docker", {})
    images = {}
    for name, node in config["available_node_types"].items():
        if name == config["head_node_type"]:
            images[name] = docker.get("head_image") or docker["image"]
        else:
            images[name] = (node.get("docker", {}).get("worker_image") or docker.get("worker_image")
                            or docker["image"])
    return images


def node_commands(config: dict, name: str) -> list[str]:
    """Setup commands the launcher runs in a node type's container (Ray's override rules)."""
    if name == config["head_node_type"]:
        return config.get("setup_commands", []) + config.get("head_setup_commands", [])
    node = config["available_node_types"][name]
    return config.get("setup_commands", []) + node.get(
        "worker_setup_commands", config.get("worker_setup_commands", []))


def check_images(config: dict, pyproject: dict) -> None:
    """Every node runs rayproject/ray:<pinned Ray>-py<allowed Python>-cuXXX|cpu (ray-ml is gone)."""
    ray_version = pinned(pyproject, "ray")
    python_ok = SpecifierSet(pyproject["project"]["requires-python"])
    for name, image in node_images(config).items():
        if "ray-ml" in image:
            raise ValueError(f"{name}: {image}: rayproject/ray-ml is deprecated (no new tags since "
                             "2.31); use rayproject/ray:<version>-py311-cuXXX")
        match = IMAGE.match(image)
        if not match:
            raise ValueError(f"{name}: {image} is not rayproject/ray:<x.y.z>-py3NN-cuNNN|cpu "
                             "(the -gpu alias moves between CUDA versions: name the CUDA)")
        if match["ray"] != ray_version:
            raise ValueError(f"{name}: image has Ray {match['ray']}, pyproject.toml pins {ray_version}")
        py = f"3.{match['py'][1:]}"
        if py not in python_ok:
            raise ValueError(f"{name}: image Python {py} is outside requires-python {python_ok}")


def check_torch(config: dict, pyproject: dict) -> None:
    """Each node installs the pinned torch, built for the CUDA of its image (cpu on cpu images)."""
    torch_version = pinned(pyproject, "torch")
    for name, image in node_images(config).items():
        installs = [m for c in node_commands(config, name) for m in TORCH_INSTALL.finditer(c)]
        if len(installs) != 1:
            raise ValueError(f"{name}: expected one `pip install torch==X --index-url "
                             f".../whl/cuNNN` in its setup commands, found {len(installs)}")
        if installs[0]["version"] != torch_version:
            raise ValueError(f"{name}: installs torch {installs[0]['version']}, "
                             f"pyproject.toml pins {torch_version}")
        platform = IMAGE.match(image)["platform"]
        if installs[0]["platform"] != platform:
            raise ValueError(f"{name}: torch built for {installs[0]['platform']} on a {platform} image")


def check_project_and_faiss(config: dict, pyproject: dict) -> None:
    """Every node pip-installs the mounted project; with its extras, exactly one FAISS (GPU on GPU nodes)."""
    mounted = {dst for dst, src in config.get("file_mounts", {}).items() if src.rstrip("/") in (".", "./")}
    extras_deps = pyproject["project"].get("optional-dependencies", {})
    core = faiss_dists(pyproject["project"]["dependencies"])
    for name, node in config["available_node_types"].items():
        commands = node_commands(config, name)
        installs = [(c, m) for c in commands for m in PROJECT_INSTALL.finditer(c)]
        if not installs:
            raise ValueError(f"{name}: setup commands never install the project: no shared disk, "
                             "so raylib and serve would not import there")
        if not any(f"cd {d}" in c for c, _ in installs for d in mounted):
            raise ValueError(f"{name}: the project install must run in a file_mounts copy of '.'")
        faiss = list(core)
        for _, m in installs:
            for extra in filter(None, (e.strip() for e in (m["extras"] or "").split(","))):
                faiss += faiss_dists(extras_deps.get(extra, []))
        faiss += [d for c in commands for d in re.findall(r"\b(faiss-[a-z0-9-]+)", c)]
        if len(faiss) != 1:
            raise ValueError(f"{name}: exactly one FAISS build per node (they share the `faiss` "
                             f"module and overwrite each other), got {faiss or 'none'}")
        if node.get("resources", {}).get("GPU", 0) and "gpu" not in faiss[0]:
            raise ValueError(f"{name}: a GPU node must get a GPU FAISS build, got {faiss[0]}")


def check_hosts(config: dict) -> None:
    """DLAMI hosts (Docker + NVIDIA runtime); p5 workers with every EFA card passed to the container."""
    for name, node in config["available_node_types"].items():
        cfg = node["node_config"]
        if not str(cfg.get("ImageId", "")).startswith(DLAMI_SSM):
            raise ValueError(f"{name}: ImageId must resolve a Deep Learning Base AMI through its SSM "
                             f"parameter ({DLAMI_SSM}...): Docker mode needs Docker + the NVIDIA "
                             "container runtime on the host, and a pinned ami- id is region-bound")
        cards = EFA_CARDS.get(cfg["InstanceType"])
        if cards is None:
            continue
        efa = [i for i in cfg.get("NetworkInterfaces", []) if i.get("InterfaceType") in ("efa", "efa-only")]
        if sorted(i["NetworkCardIndex"] for i in efa) != list(range(cards)):
            raise ValueError(f"{name}: {cfg['InstanceType']} needs one EFA interface on each of its "
                             f"{cards} network cards, else NCCL falls back to TCP between nodes")
        options = " ".join(config.get("docker", {}).get("run_options", [])
                           + node.get("docker", {}).get("worker_run_options", []))
        for needed in ("/dev/infiniband", "memlock=-1", "FI_PROVIDER=efa"):
            if needed not in options:
                raise ValueError(f"{name}: the container needs `{needed}` to use EFA")
        if not any("efa_installer.sh" in c for c in node_commands(config, name)):
            raise ValueError(f"{name}: no libfabric/aws-ofi-nccl in the container (efa_installer.sh)")


def check_release(config: dict, pyproject: dict) -> None:
    """All version, packaging and host checks of the cluster file against pyproject.toml."""
    check_images(config, pyproject)
    check_torch(config, pyproject)
    check_project_and_faiss(config, pyproject)
    check_hosts(config)
    _configure_from_network_interfaces(config)  # Ray's own check: every interface has subnet + groups


def check_invariants(config: dict) -> None:
    """32 H100s at most across p5.48xlarge workers, a GPU-free head, no secrets, private dashboard."""
    validate_config(prepare_config(copy.deepcopy(config)))
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    if head.get("resources", {}).get("GPU", 0):
        raise ValueError("the head node must not take GPU work")
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    total = 0
    for node in workers:
        if node["node_config"]["InstanceType"] != "p5.48xlarge" or node["resources"].get("GPU") != 8:
            raise ValueError("GPU workers are p5.48xlarge with 8 GPUs declared")
        total += node["max_workers"] * node["resources"]["GPU"]
    if total != 32 or config["max_workers"] != 4:
        raise ValueError(f"expected 4 workers x 8 = 32 H100s (the paper's), got {total}")
    text = yaml.safe_dump(config)
    if re.search(r"AKIA[0-9A-Z]{16}|aws_secret_access_key|aws_access_key_id|password", text, re.I):
        raise ValueError("credentials must come from the instance profile, not the file")
    for node in nodes.values():
        if "IamInstanceProfile" not in node["node_config"]:
            raise ValueError("every node needs the S3 instance profile")
    if any("--dashboard-host=0.0.0.0" in c for c in config["head_start_ray_commands"]):
        raise ValueError("the dashboard must not listen on all interfaces")


def test_cluster_config_is_valid():
    check_invariants(yaml.safe_load(CONFIG.read_text()))


def test_cluster_matches_pyproject():
    check_release(yaml.safe_load(CONFIG.read_text()), load_pyproject())


def _planted(mutate):
    config = yaml.safe_load(CONFIG.read_text())
    mutate(config)
    return config


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_wokers=4),                                          # misspelt key: schema
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="two"),  # wrong type: schema
    lambda c: c["available_node_types"]["gpu_worker"]["resources"].update(GPU=4),  # 16 GPUs
    lambda c: c["available_node_types"]["gpu_worker"]["node_config"].update(
        aws_secret_access_key="x"),                                             # a secret
    lambda c: c["head_start_ray_commands"].append("ray start --head --dashboard-host=0.0.0.0"),
    lambda c: c["available_node_types"]["head"]["resources"].update(GPU=1),
])
def test_planted_errors_are_caught(mutate):
    with pytest.raises(Exception):
        check_invariants(_planted(mutate))


def _gpu(c):
    return c["available_node_types"]["gpu_worker"]


def _sub(c, key, old, new):
    c[key] = [cmd.replace(old, new) for cmd in c[key]]


BAD_COPIES = {
    "ray-ml image": lambda c, p: c["docker"].update(image="rayproject/ray-ml:2.60.0-py311-gpu"),
    "ray-ml worker image": lambda c, p: _gpu(c).setdefault("docker", {}).update(
        worker_image="rayproject/ray-ml:2.60.0-py311-gpu"),
    "-gpu alias": lambda c, p: c["docker"].update(image="rayproject/ray:2.60.0-py311-gpu"),
    "image Ray != pyproject": lambda c, p: c["docker"].update(image="rayproject/ray:2.59.0-py311-cu126"),
    "pyproject Ray != image": lambda c, p: p["project"].update(dependencies=[
        d.replace("==2.60.0", "==2.61.0") if d.startswith("ray[") else d for d in p["project"]["dependencies"]]),
    "image Python < requires-python": lambda c, p: c["docker"].update(image="rayproject/ray:2.60.0-py310-cu126"),
    "image CUDA != torch CUDA": lambda c, p: c["docker"].update(image="rayproject/ray:2.60.0-py311-cu128"),
    "torch != pyproject": lambda c, p: _sub(c, "setup_commands", "torch==2.13.0", "torch==2.12.0"),
    "faiss-cpu next to the gpu extra": lambda c, p: c["worker_setup_commands"].append("pip install faiss-cpu"),
    "faiss-cpu back in core deps": lambda c, p: p["project"]["dependencies"].append("faiss-cpu>=1.8"),
    "gpu extra with both": lambda c, p: p["project"]["optional-dependencies"].update(
        gpu=["faiss-cpu>=1.8", "faiss-gpu>=1.15"]),
    "GPU node with faiss-cpu": lambda c, p: _sub(c, "worker_setup_commands", ".[gpu]", ".[cpu]"),
    "workers never install the project": lambda c, p: c.update(worker_setup_commands=[
        cmd for cmd in c["worker_setup_commands"] if "raylib-embed" not in cmd]),
    "plain Ubuntu AMI": lambda c, p: _gpu(c)["node_config"].update(ImageId="ami-0c7217cdde317cfec"),
    "no EFA interfaces": lambda c, p: _gpu(c)["node_config"].pop("NetworkInterfaces"),
    "EFA devices not in the container": lambda c, p: _gpu(c).pop("docker"),
    "EFA interface without subnet": lambda c, p: _gpu(c)["node_config"]["NetworkInterfaces"][5].pop("SubnetId"),
}


@pytest.mark.parametrize("name", list(BAD_COPIES))
def test_bad_copies_fail(name, tmp_path):
    """Each planted mistake, written to a copy of the cluster file, fails check_release."""
    config, pyproject = yaml.safe_load(CONFIG.read_text()), load_pyproject()
    BAD_COPIES[name](config, pyproject)
    copy_path = tmp_path / "h100.yaml"
    copy_path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError):
        check_release(yaml.safe_load(copy_path.read_text()), pyproject)


def test_serve_config_validates_for_serve_deploy():
    """serve/config.yaml is what `serve deploy` accepts (Ray's ServeDeploySchema), importing raylib.ray_serve.app."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    app = schema.applications[0]
    assert app.import_path == "raylib.ray_serve.app:app"
    assert "working_dir" not in (app.runtime_env or {}), "the project is installed on every node"


def test_wheel_ships_the_serve_app_and_imports_outside_the_repo(tmp_path):
    """The built wheel holds the Serve app (raylib/ray_serve/), and raylib.ray_serve.app imports from it with no repo on the path."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (src / name).write_text((ROOT / name).read_text())
    for pkg in ("raylib",):
        subprocess.run(["cp", "-r", str(ROOT / pkg), str(src / pkg)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("raylib_embed-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"raylib/ray_serve/__init__.py", "raylib/ray_serve/app.py", "raylib/ray_serve/schemas.py", "raylib/__init__.py"} <= set(names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--target", str(target), str(wheel)], check=True, timeout=300)
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    probe = ("import raylib.ray_serve.app, raylib, sys; print(raylib.ray_serve.app.__file__); "
             "assert raylib.ray_serve.app.__file__.startswith(sys.argv[1]), raylib.ray_serve.app.__file__")
    out = subprocess.run([sys.executable, "-c", probe, str(target)], cwd=empty, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin",
                                                      "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
