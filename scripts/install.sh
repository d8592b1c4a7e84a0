#!/usr/bin/env bash
# Install everything hvd-trainer needs on a fresh Debian machine, idempotently.
#
#   scripts/install.sh                 # this machine: CPU torch 2.13.0 pinned, Horovod CPU build
#   scripts/install.sh --system-torch  # a cluster: keep the torch (CUDA) and MPI already on the
#                                      # python you run this with; Horovod is built with NCCL when
#                                      # torch sees CUDA (not exercised here: no GPU)
#   scripts/install.sh --image         # inside a container build (containers/): no test tooling
#                                      # (SLURM, sshd, Charliecloud), apt without recommends
#   scripts/install.sh --deps-only     # everything but the package itself (an image's dependency
#                                      # layer: a change to the code alone then rebuilds little)
#
# Environment (all optional): HVD_TRAINER_VENV (default REPO/.venv), HVD_TRAINER_CACHE (default
# ~/.cache/hvd-trainer; a prefilled wheels/<key>/ skips the Horovod build), HVD_TRAINER_TORCH_VERSION
# and HVD_TRAINER_HOROVOD_VERSION (the pins below), HVD_TRAINER_MPI_VERSION (fail unless the
# system's Open MPI is this version: an image's MPI must match the cluster's).
#
# Horovod 0.28.1 (its last release) asks for C++14, but torch >= 2.1 headers need C++17, so the
# sdist is patched to C++17 before it is built. The built wheel is cached outside git
# ($HVD_TRAINER_CACHE, default ~/.cache/hvd-trainer) so a second install takes seconds.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVD_TRAINER_VENV:-$REPO/.venv}"
CACHE="${HVD_TRAINER_CACHE:-$HOME/.cache/hvd-trainer}"
TORCH_PIN="torch==${HVD_TRAINER_TORCH_VERSION:-2.13.0}"
HOROVOD_VERSION="${HVD_TRAINER_HOROVOD_VERSION:-0.28.1}"
SYSTEM_TORCH=0
IMAGE=0
DEPS_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --system-torch) SYSTEM_TORCH=1 ;;
    --image) IMAGE=1 ;;
    --deps-only) DEPS_ONLY=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

log() { printf '[install] %s\n' "$*" >&2; }
die() { printf '[install] ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. system packages (only what is missing) -------------------------------------------------
need_apt=()
command -v mpirun >/dev/null 2>&1 || need_apt+=(openmpi-bin)
command -v mpicc  >/dev/null 2>&1 || need_apt+=(libopenmpi-dev)
[ -x /usr/bin/cmake ] || need_apt+=(cmake)
command -v patch  >/dev/null 2>&1 || need_apt+=(patch)
command -v g++ >/dev/null 2>&1 || need_apt+=(g++)
if [ "$IMAGE" = 0 ]; then  # test tooling: not needed inside an image
# SLURM (slurmctld, slurmd, munge, srun with PMIx): the tests start a one-node cluster of their own
command -v slurmctld >/dev/null 2>&1 || need_apt+=(slurm-wlm)
# the hosts testbed (network namespaces, each "host" running a real sshd; tc caps links)
[ -x /usr/sbin/sshd ] || need_apt+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need_apt+=(openssh-client)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
# containers: Charliecloud builds Dockerfiles without a daemon; debootstrap makes the base image
command -v ch-image >/dev/null 2>&1 || need_apt+=(charliecloud-runtime charliecloud-builders python3-lark)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v fakeroot >/dev/null 2>&1 || need_apt+=(fakeroot)
fi
# a bare base image (debootstrap minbase, debian:bookworm) has no python3, or no venv module
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
apt_opts=(-y -qq)
[ "$IMAGE" = 1 ] && apt_opts+=(--no-install-recommends)
if [ ${#need_apt[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "missing ${need_apt[*]} and no apt-get: install MPI, cmake and g++ first"
  log "apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install "${apt_opts[@]}" "${need_apt[@]}" >/dev/null
fi
if [ -n "${HVD_TRAINER_MPI_VERSION:-}" ]; then
  have_mpi="$(mpirun --version 2>/dev/null | head -1)"
  case "$have_mpi" in
    *"Open MPI) $HVD_TRAINER_MPI_VERSION") ;;
    *) die "HVD_TRAINER_MPI_VERSION=$HVD_TRAINER_MPI_VERSION but this system has '$have_mpi'" ;;
  esac
fi

# --- 2. venv ---------------------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  if [ "$SYSTEM_TORCH" = 1 ]; then python3 -m venv --system-site-packages "$VENV"
  else python3 -m venv "$VENV"; fi
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)

# Skip the Python part entirely when nothing that feeds it changed since the last good install.
# (the package list is part of the key: a new top-level package needs the editable install redone)
stamp_key="$( (cat "$REPO/setup.py" "$REPO/scripts/install.sh" "$REPO/scripts/horovod-wake-on-wait.patch"
               cd "$REPO" && { ls -d ./*/__init__.py 2>/dev/null || true; }) \
  | sha256sum | cut -c1-16)-$SYSTEM_TORCH"
stamp="$VENV/.hvd-trainer-installed"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_key" ] \
   && "$PY" -c "import horovod.torch, mpi4py, hvd_trainer, mpi_jobs" 2>/dev/null; then
  log "up to date ($VENV)"
  exit 0
fi

# --- 3. python dependencies -------------------------------------------------------------------------
if [ "$SYSTEM_TORCH" = 1 ]; then
  "$PY" -c "import torch" 2>/dev/null || die "--system-torch: torch is not importable from $PY"
else
  "${PIP[@]}" "$TORCH_PIN"
fi
"${PIP[@]}" numpy mpi4py pyyaml "pydantic>=2.7" tqdm scikit-learn pillow matplotlib tensorboard prometheus_client "optuna>=4.0" pytest pytest-timeout pytest-random-order hypothesis \
  cloudpickle psutil packaging wheel setuptools

# --- 4. Horovod, built once per (python, torch, MPI) and cached ---------------------------------
TORCH_VER="$("$PY" -c 'import torch; print(torch.__version__)')"
HAS_CUDA="$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')"
MPI_VER="$(mpirun --version 2>/dev/null | head -1 | tr -cd '[:alnum:]._-')"
PY_VER="$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])')"
# the trainer's patch to Horovod (see the patch's header): a changed patch is a new build
HVD_PATCH="$REPO/scripts/horovod-wake-on-wait.patch"
PATCH_ID="$(sha256sum "$HVD_PATCH" | cut -c1-8)"
key="hvd${HOROVOD_VERSION}-py${PY_VER}-torch${TORCH_VER}-${MPI_VER}-cuda${HAS_CUDA}-p${PATCH_ID}"
wheel_dir="$CACHE/wheels/$key"

horovod_ok() {
  [ "$(cat "$VENV/.horovod-build" 2>/dev/null)" = "$key" ] || return 1  # the build this key names
  HVD_WANT="$HOROVOD_VERSION" "$PY" - <<'PYEOF' 2>/dev/null
import os, horovod, horovod.torch as hvd
assert horovod.__version__ == os.environ["HVD_WANT"]
assert hvd.mpi_built() and hvd.gloo_built()
PYEOF
}

if ! horovod_ok; then
  if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
    log "building horovod $HOROVOD_VERSION for torch $TORCH_VER (takes ~8 min on 2 cores; cached in $wheel_dir)"
    build="$(mktemp -d)"
    trap 'rm -rf "$build"' EXIT
    "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$build" \
      || die "could not download the horovod $HOROVOD_VERSION sdist from PyPI"
    tar -xzf "$build"/horovod-"$HOROVOD_VERSION".tar.gz -C "$build"
    src="$build/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers: '#error C++17 or later compatible compiler is required'
    sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
      "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
    grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
      || die "horovod sdist layout changed: could not patch the C++ standard"
    patch -s -p1 -d "$src" < "$HVD_PATCH" || die "could not apply $HVD_PATCH to horovod $HOROVOD_VERSION"
    export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 \
           HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
    if [ "$HAS_CUDA" = 1 ]; then export HOROVOD_GPU_OPERATIONS=NCCL; fi
    export MAKEFLAGS="-j$(nproc)"
    # Debian's cmake (3.25): pip's cmake 4.x rejects the bundled gloo's cmake_minimum_required.
    mkdir -p "$wheel_dir"
    PATH="/usr/bin:$PATH" "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$wheel_dir" "$src" \
      > "$build/build.log" 2>&1 || { tail -40 "$build/build.log" >&2; rm -rf "$wheel_dir"; die "horovod build failed (log above)"; }
  fi
  "${PIP[@]}" --no-deps --force-reinstall "$wheel_dir"/horovod-*.whl
  echo "$key" > "$VENV/.horovod-build"
fi
"$VENV/bin/horovodrun" --check-build > "$VENV/horovod-check-build.txt" 2>&1 || true
for feature in PyTorch MPI Gloo; do
  grep -q "\[X\] $feature" "$VENV/horovod-check-build.txt" \
    || { cat "$VENV/horovod-check-build.txt" >&2; die "horovodrun --check-build: $feature missing"; }
done

if [ "$DEPS_ONLY" = 1 ]; then
  log "dependencies ready: $VENV (torch $TORCH_VER, horovod $HOROVOD_VERSION); package not installed"
  exit 0
fi

# --- 5. the package itself ---------------------------------------------------------------------------
"${PIP[@]}" --no-deps -e "$REPO"
"$PY" -c "import hvd_trainer" || die "hvd_trainer does not import"
echo "$stamp_key" > "$stamp"
log "ready: $VENV (torch $TORCH_VER, horovod $HOROVOD_VERSION)"
