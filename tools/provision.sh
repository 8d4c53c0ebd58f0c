#!/usr/bin/env bash
# Provision libtorch for VoltTrain: a Python virtual environment outside the clone holding the
# PyPI wheel torch==2.11.0 (the version tch 0.24 is built against), plus, with --reference, the
# Python reference stack (transformers, peft, bitsandbytes, ...) that parity tests and
# benchmarks compare against.
#
# With --reference also a second venv holding MLflow (its own, because mlflow's dependency pins
# conflict with the reference stack's pyarrow/datasets): the tracker tests start `mlflow server`
# from it and read runs back with its client.
#
# Also, into the same venv, the pinned NVIDIA wheels (NVIDIA_PKGS) whose headers build.rs
# compiles the NCCL path of the dist shim against.
#
# Idempotent: a venv whose marker file names the wanted versions is trusted and nothing is done.
# A venv without its marker (an interrupted install) is deleted and built again, so a half-built
# venv is never used. The marker is written last.
#
# With --reference also llama.cpp's own Hugging Face -> GGUF converter (convert_hf_to_gguf.py, its
# `conversion` package and the gguf-py it ships with), which the GGUF export tests run as the
# reference: taken from the PyPI sdist of llama-cpp-python (LLAMA_CPP_SDIST_*, sha256-pinned),
# which vendors llama.cpp; only those files are kept, under $VOLTTRAIN_CACHE/llama.cpp-converter-*.
#
# Usage: tools/provision.sh [--reference] [--print-env]
#   VOLTTRAIN_CACHE   cache root            (default: $HOME/.cache/volttrain)
#   VOLTTRAIN_VENV    the venv itself       (default: $VOLTTRAIN_CACHE/venv-torch-2.11.0)
#   VOLTTRAIN_PYTHON  interpreter to use    (default: python3)
#   VOLTTRAIN_MLFLOW_VENV  the MLflow venv  (default: $VOLTTRAIN_CACHE/venv-mlflow-<version>)
set -euo pipefail

TORCH_VERSION="2.11.0"
# Reference stack, pinned so parity results are reproducible.
REFERENCE_PKGS=(
  "transformers==5.23.0"
  "peft==0.21.2"
  "bitsandbytes==0.50.2"
  "safetensors==0.8.0"
  "datasets==5.2.0"
  "tensorboard==2.21.0"
  "pyarrow==26.0.1"
  "tokenizers==0.23.3"
  "trl==1.16.0"
  "wandb==0.31.0"
  # imported by llama.cpp's converter for llama-family vocabularies (see LLAMA_CPP_SDIST_*)
  "sentencepiece==0.2.1"
)

# llama.cpp's convert_hf_to_gguf.py (the GGUF export tests' reference): llama-cpp-python's sdist
# vendors llama.cpp; its sha256 is PyPI's. Only the converter, its `conversion` package and the
# matching gguf-py (0.19.0) are extracted.
LLAMA_CPP_SDIST_VERSION="0.3.36"
LLAMA_CPP_SDIST_URL="https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/llama_cpp_python-0.3.36.tar.gz"
LLAMA_CPP_SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"

# NVIDIA wheels for the NCCL path of the dist shim (build.rs): NCCL's and the CUDA runtime's
# headers and libraries at the versions torch 2.11.0+cu130 itself requires (its METADATA:
# nvidia-nccl-cu13==2.28.9, cuda-toolkit[cudart]==13.0.2 -> nvidia-cuda-runtime==13.0.96), plus
# the CUDA host headers that the runtime's headers include and torch does not install:
# crt/host_config.h (cuda-toolkit[crt] -> nvidia-cuda-crt==13.0.88) and nv/target
# (cuda-toolkit[cccl] -> nvidia-cuda-cccl==13.0.85). Headers and .so files only, about 25 MB;
# installed with --no-deps into the torch venv, under its own marker so an existing venv gets
# them without a rebuild.
NVIDIA_PKGS=(
  "nvidia-nccl-cu13==2.28.9"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-cccl==13.0.85"
)

# MLflow for the tracker tests (tests/trackers_mlflow.rs), in a venv of its own.
MLFLOW_VERSION="3.17.2"

want_reference=0
print_env=0
for arg in "$@"; do
  case "$arg" in
    --reference) want_reference=1 ;;
    --print-env) print_env=1 ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "provision: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

CACHE="${VOLTTRAIN_CACHE:-$HOME/.cache/volttrain}"
VENV="${VOLTTRAIN_VENV:-$CACHE/venv-torch-$TORCH_VERSION}"
PY="${VOLTTRAIN_PYTHON:-python3}"
MARK_TORCH="$VENV/.volttrain-torch-ok"
MARK_REF="$VENV/.volttrain-reference-ok"
MARK_NVIDIA="$VENV/.volttrain-nvidia-ok"
MLFLOW_VENV="${VOLTTRAIN_MLFLOW_VENV:-$CACHE/venv-mlflow-$MLFLOW_VERSION}"
MARK_MLFLOW="$MLFLOW_VENV/.volttrain-mlflow-ok"
CONVERTER="${VOLTTRAIN_LLAMA_CPP_CONVERTER:-$CACHE/llama.cpp-converter-$LLAMA_CPP_SDIST_VERSION}"
MARK_CONVERTER="$CONVERTER/.volttrain-converter-ok"
NVIDIA_STAMP="$(printf '%s\n' "${NVIDIA_PKGS[@]}" | sha256sum | cut -c1-16)"
REF_STAMP="$(printf '%s\n' "${REFERENCE_PKGS[@]}" | sha256sum | cut -c1-16)"

log() { echo "provision: $*" >&2; }
die() { echo "provision: error: $*" >&2; exit 1; }

if ! command -v "$PY" >/dev/null 2>&1; then
  die "'$PY' not found. Install Python 3.9+ with venv and pip (Debian/Ubuntu: apt-get install python3 python3-venv python3-pip), or point VOLTTRAIN_PYTHON at one."
fi

torch_ok() {
  [ -f "$MARK_TORCH" ] && [ "$(cat "$MARK_TORCH")" = "$TORCH_VERSION" ] \
    && [ -d "$(cat "$VENV/.volttrain-libtorch" 2>/dev/null)/lib" ]
}

# gloo's C++ headers: the torch wheel does not ship them, and ProcessGroupGloo.hpp (compiled into
# the dist shim by build.rs) includes them. Headers only: nothing links Debian's libgloo. A build
# without them leaves the Gloo backend out (CPU multi-process training); provisioning, and so CI,
# always installs them.
gloo_ok() { [ -f /usr/include/gloo/config.h ] || [ -f "${VOLTTRAIN_GLOO_INCLUDE:-/nonexistent}/gloo/config.h" ]; }
if ! gloo_ok; then
  if ! command -v apt-get >/dev/null 2>&1; then
    die "gloo headers (gloo/config.h) are missing and apt-get is not available. Install your distribution's gloo development headers, or set VOLTTRAIN_GLOO_INCLUDE to a directory holding gloo/ (e.g. from a gloo source checkout), then run again."
  fi
  log "installing libgloo-dev (gloo headers for the dist shim)"
  sudo_cmd=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "gloo headers are missing; run 'apt-get install libgloo-dev' as root (sudo is not available here), then run again."
    sudo_cmd="sudo"
  fi
  if ! $sudo_cmd apt-get install -y -q libgloo-dev >&2; then
    $sudo_cmd apt-get update -q >&2 || true
    $sudo_cmd apt-get install -y -q libgloo-dev >&2 \
      || die "'apt-get install libgloo-dev' failed; install it by hand (it provides /usr/include/gloo), then run again."
  fi
  gloo_ok || die "libgloo-dev installed but /usr/include/gloo/config.h is missing"
fi

if ! torch_ok; then
  if [ -e "$VENV" ]; then
    log "removing incomplete environment $VENV (no completion marker)"
    rm -rf "$VENV"
  fi
  mkdir -p "$(dirname "$VENV")"
  log "creating $VENV with torch==$TORCH_VERSION (about 4.6 GB, 1-3 minutes)"
  if ! "$PY" -m venv "$VENV"; then
    rm -rf "$VENV"
    die "'$PY -m venv' failed. Install the venv module (Debian/Ubuntu: apt-get install python3-venv)."
  fi
  if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$VENV"
    die "pip is missing in the new venv. Install pip for $PY (Debian/Ubuntu: apt-get install python3-pip python3-venv)."
  fi
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION" numpy; then
    rm -rf "$VENV"
    die "pip could not install torch==$TORCH_VERSION. Check that PyPI is reachable and there is ~6 GB free under $(dirname "$VENV"), then run again."
  fi
  libtorch="$("$VENV/bin/python" - <<'PY'
import os, torch
assert torch.__version__.split("+")[0] == "2.11.0", torch.__version__
print(os.path.dirname(torch.__file__))
PY
)" || { rm -rf "$VENV"; die "torch installed but does not import as 2.11.0"; }
  [ -f "$libtorch/lib/libtorch_cpu.so" ] || { rm -rf "$VENV"; die "torch wheel has no lib/libtorch_cpu.so under $libtorch"; }
  echo "$libtorch" > "$VENV/.volttrain-libtorch"
  echo "$TORCH_VERSION" > "$MARK_TORCH"
  log "torch $TORCH_VERSION ready in $VENV"
fi

# The NCCL build inputs (see NVIDIA_PKGS). Quick when the marker matches: nothing runs.
if [ ! -f "$MARK_NVIDIA" ] || [ "$(cat "$MARK_NVIDIA")" != "$NVIDIA_STAMP" ]; then
  rm -f "$MARK_NVIDIA"
  log "installing NCCL / CUDA runtime headers for the NCCL build: ${NVIDIA_PKGS[*]}"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q --no-deps "${NVIDIA_PKGS[@]}"; then
    die "pip could not install ${NVIDIA_PKGS[*]} into $VENV (the headers build.rs compiles NCCL support against); check network access to PyPI and run again."
  fi
  sp="$(dirname "$(cat "$VENV/.volttrain-libtorch")")"
  for f in nvidia/nccl/include/nccl.h nvidia/nccl/lib/libnccl.so.2 nvidia/cu13/include/cuda_runtime_api.h \
           nvidia/cu13/include/crt/host_config.h nvidia/cu13/include/nv/target nvidia/cu13/lib/libcudart.so.13; do
    [ -e "$sp/$f" ] || die "after installing ${NVIDIA_PKGS[*]}: $sp/$f is missing"
  done
  echo "$NVIDIA_STAMP" > "$MARK_NVIDIA"
  log "NCCL build headers ready"
fi

if [ "$want_reference" = 1 ] && { [ ! -f "$MARK_REF" ] || [ "$(cat "$MARK_REF")" != "$REF_STAMP" ]; }; then
  rm -f "$MARK_REF"
  log "installing the Python reference stack: ${REFERENCE_PKGS[*]}"
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -q "torch==$TORCH_VERSION" "${REFERENCE_PKGS[@]}"; then
    die "pip could not install the reference stack into $VENV; check network access to PyPI and run again."
  fi
  "$VENV/bin/python" -c "import torch, transformers, peft, bitsandbytes, safetensors; assert torch.__version__.startswith('$TORCH_VERSION')" \
    || die "reference stack installed but does not import (or replaced torch $TORCH_VERSION)"
  echo "$REF_STAMP" > "$MARK_REF"
  log "reference stack ready"
fi

if [ "$want_reference" = 1 ] && { [ ! -f "$MARK_MLFLOW" ] || [ "$(cat "$MARK_MLFLOW")" != "$MLFLOW_VERSION" ]; }; then
  if [ -e "$MLFLOW_VENV" ]; then
    log "removing incomplete environment $MLFLOW_VENV (no completion marker)"
    rm -rf "$MLFLOW_VENV"
  fi
  mkdir -p "$(dirname "$MLFLOW_VENV")"
  log "creating $MLFLOW_VENV with mlflow==$MLFLOW_VERSION (about 0.9 GB)"
  "$PY" -m venv "$MLFLOW_VENV" || { rm -rf "$MLFLOW_VENV"; die "'$PY -m venv' failed for the MLflow venv"; }
  if ! "$MLFLOW_VENV/bin/python" -m pip install --disable-pip-version-check -q "mlflow==$MLFLOW_VERSION"; then
    rm -rf "$MLFLOW_VENV"
    die "pip could not install mlflow==$MLFLOW_VERSION into $MLFLOW_VENV; check network access to PyPI and run again."
  fi
  "$MLFLOW_VENV/bin/python" -c "import mlflow; assert mlflow.__version__ == '$MLFLOW_VERSION', mlflow.__version__" \
    || { rm -rf "$MLFLOW_VENV"; die "mlflow installed but does not import as $MLFLOW_VERSION"; }
  echo "$MLFLOW_VERSION" > "$MARK_MLFLOW"
  log "mlflow $MLFLOW_VERSION ready in $MLFLOW_VENV"
fi

if [ "$want_reference" = 1 ] && { [ ! -f "$MARK_CONVERTER" ] || [ "$(cat "$MARK_CONVERTER")" != "$LLAMA_CPP_SDIST_SHA256" ]; }; then
  log "fetching llama.cpp's convert_hf_to_gguf.py from llama-cpp-python $LLAMA_CPP_SDIST_VERSION (sdist, 77 MB)"
  mkdir -p "$(dirname "$CONVERTER")"
  rm -rf "$CONVERTER".partial.*  # an interrupted earlier attempt
  staging="$(mktemp -d "$CONVERTER.partial.XXXXXX")"
  # download, verify, extract the three parts into the staging dir, then rename: a converter
  # directory is complete or absent
  if ! "$VENV/bin/python" - "$LLAMA_CPP_SDIST_URL" "$LLAMA_CPP_SDIST_SHA256" "$staging" <<'PY'
import hashlib, os, sys, tarfile, urllib.request
url, sha, out = sys.argv[1:]
tgz = os.path.join(out, "sdist.tar.gz")
with urllib.request.urlopen(url, timeout=300) as r, open(tgz, "wb") as f:
    h = hashlib.sha256()
    while chunk := r.read(1 << 20):
        h.update(chunk)
        f.write(chunk)
if h.hexdigest() != sha:
    sys.exit(f"{url}: sha256 {h.hexdigest()}, expected {sha}")
root = None
with tarfile.open(tgz) as t:
    members = []
    for m in t.getmembers():
        parts = m.name.split("/")
        rel = "/".join(parts[3:])  # <sdist>/vendor/llama.cpp/<rel>
        if parts[1:3] != ["vendor", "llama.cpp"] or not m.isfile():
            continue
        if rel in ("convert_hf_to_gguf.py", "LICENSE") or rel.startswith(("conversion/", "gguf-py/gguf/")) or rel == "gguf-py/LICENSE":
            m.name = rel
            members.append(m)
    t.extractall(out, members=members, filter="data")
os.remove(tgz)
for need in ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py"):
    if not os.path.isfile(os.path.join(out, need)):
        sys.exit(f"the sdist has no vendor/llama.cpp/{need}")
PY
  then
    rm -rf "$staging"
    die "could not fetch llama.cpp's converter from $LLAMA_CPP_SDIST_URL (network, or the sha256 check failed: see above); run again."
  fi
  echo "$LLAMA_CPP_SDIST_SHA256" > "$staging/.volttrain-converter-ok"
  rm -rf "$CONVERTER"
  mv "$staging" "$CONVERTER"
  log "llama.cpp converter ready in $CONVERTER"
fi

if [ "$print_env" = 1 ]; then
  libtorch="$(cat "$VENV/.volttrain-libtorch")"
  echo "export LIBTORCH='$libtorch'"
  echo "export VOLTTRAIN_VENV='$VENV'"
  echo "export VOLTTRAIN_PYTHON_REF='$VENV/bin/python'"
  if [ -f "$MARK_MLFLOW" ] && [ "$(cat "$MARK_MLFLOW")" = "$MLFLOW_VERSION" ]; then
    echo "export VOLTTRAIN_MLFLOW_PYTHON='$MLFLOW_VENV/bin/python'"
  fi
  if [ -f "$MARK_CONVERTER" ] && [ "$(cat "$MARK_CONVERTER")" = "$LLAMA_CPP_SDIST_SHA256" ]; then
    echo "export VOLTTRAIN_LLAMA_CPP_CONVERTER='$CONVERTER'"
  fi
fi
