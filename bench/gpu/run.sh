#!/usr/bin/env bash
# GPU proof, the one command for an air-gapped GPU host (README: GPU proof):
#   make gpu-kit                           # on a machine with the package index; carry .gpu-kit/
#   OUT=/tmp/proof bash bench/gpu/run.sh   # on the GPU host: $OUT/gpu.json (default out/gpu)
#   bash bench/gpu/run.sh --cpu-smoke      # the same four checks at toy size on the CPU
# Installs the kit (.gpu-kit, or $GPU_KIT) into a temporary venv that sees the host's packages
# (torch, transformers, ...: --system-site-packages), then runs bench/gpu/checks.py with it.
# Smoke mode on an interpreter that is not the kit's (cp312), e.g. this repo's .venv: the kit,
# when present, is installed into a temporary --target for Python 3.12 (checks that every
# wheel installs; nothing from it is imported) and the checks run on this interpreter's Ray.
# Without a kit: GPU mode stops, smoke mode says "absent" in gpu.json and goes on.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
MODE=gpu
ARGS=()
for a in "$@"; do
  case "$a" in
    --cpu-smoke) MODE=cpu-smoke; ARGS+=("--cpu-smoke") ;;
    *) ARGS+=("$a") ;;
  esac
done
OUT="${OUT:-$ROOT/out/gpu}"
KIT="${GPU_KIT:-$ROOT/.gpu-kit}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TMP="$(mktemp -d "${TMPDIR:-/tmp}/gpu-proof-kit.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

kit_py_ok() { "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; }
if compgen -G "$KIT/*.whl" >/dev/null; then
  if kit_py_ok; then
    start=$(date +%s)
    if "$PY" -m venv --without-pip --system-site-packages "$TMP/venv" 2>/dev/null \
       && "$PY" -m pip --python "$TMP/venv/bin/python" install -q --no-index --no-deps \
            "$KIT"/*.whl >"$TMP/pip.log" 2>&1; then
      PY="$TMP/venv/bin/python"
      KIT_STATE="installed into a venv with the host's site-packages ($(( $(date +%s) - start )) s)"
    else  # no venv module or an old pip: a plain target dir on PYTHONPATH
      "$PY" -m pip install -q --no-index --no-deps --target "$TMP/site" "$KIT"/*.whl >"$TMP/pip.log" 2>&1 \
        || { cat "$TMP/pip.log"; echo "kit install failed" >&2; exit 2; }
      export PYTHONPATH="$TMP/site${PYTHONPATH:+:$PYTHONPATH}"
      KIT_STATE="installed into --target on PYTHONPATH ($(( $(date +%s) - start )) s)"
    fi
  elif [ "$MODE" = cpu-smoke ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$TMP/kit312" --python-version 3.12 \
        --implementation cp --abi cp312 --only-binary=:all: \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_5_x86_64 \
        "$KIT"/*.whl >"$TMP/pip.log" 2>&1 \
      || { cat "$TMP/pip.log"; echo "kit install (cp312 target) failed" >&2; exit 2; }
    n=$(ls "$KIT"/*.whl | wc -l)
    test -f "$TMP/kit312/ray/_raylet.so" || { echo "kit installed without ray/_raylet.so" >&2; exit 2; }
    KIT_STATE="$n wheels installed for cp312 into a temporary target (not imported: this is Python $("$PY" -c 'import platform; print(platform.python_version())')); checks run on this interpreter's Ray"
  else
    echo "the kit is for Python 3.12; $PY is $("$PY" -V 2>&1) (set PYTHON=python3.12)" >&2
    exit 2
  fi
elif [ "$MODE" = cpu-smoke ]; then
  KIT_STATE="absent (no $KIT: smoke runs on this interpreter's Ray)"
else
  "$PY" -c 'import ray' 2>/dev/null || { echo "no kit at $KIT and no Ray: run make gpu-kit and carry .gpu-kit/" >&2; exit 2; }
  KIT_STATE="absent (Ray already installed on this host)"
fi
echo "kit: $KIT_STATE" >&2
cd "$ROOT" && PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  timeout "${GPU_PROOF_TIMEOUT_S:-900}" "$PY" bench/gpu/checks.py --out "$OUT" --kit "$KIT_STATE" "${ARGS[@]}"
