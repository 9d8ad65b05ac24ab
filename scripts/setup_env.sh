#!/usr/bin/env bash
# Creates (or verifies) .venv with the kit's pinned stack. Idempotent: a stamp keyed by the
# requirement pins makes a second run a no-op in ~1 s.
#
# Two packages have no usable wheel on PyPI for this stack and are built from their sdists
# (facts: docs/INSTALL.md):
#   mmcv 2.1.0      C++20 instead of C++17 (torch 2.14 headers), compiled ops, ~15 min on 2 cores
#   learn2learn 0.2.0  its Cython-0.29 C files fail on Python 3.11 -> re-cythonize with Cython 3
# The built wheels go to a user-level cache outside the clone (PINPP_WHEEL_CACHE, default
# ~/.cache/pinpp/wheels/<key>) so fresh clones and CI on the same machine reuse them.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PINPP_VENV:-$ROOT/.venv}"
PY="${PINPP_PYTHON:-python3.11}"
TORCH_PIN="torch==2.14.1 torchvision==0.29.1"
MMCV_VERSION=2.1.0
L2L_VERSION=0.2.0

command -v "$PY" >/dev/null || { echo "setup_env: $PY not found; install Python 3.11 or set PINPP_PYTHON" >&2; exit 1; }

# CUDA ops only where a GPU driver is present; the key keeps CPU and CUDA builds apart.
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then FLAVOUR=cuda; else FLAVOUR=cpu; fi
PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
KEY="torch2.14.1-${PYTAG}-$(uname -m)-${FLAVOUR}"
CACHE="${PINPP_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pinpp/wheels}/$KEY"

STAMP_SRC="$(cat "$ROOT/requirements.txt" "$ROOT/scripts/setup_env.sh" "$ROOT/pyproject.toml" 2>/dev/null | sha256sum | cut -c1-16)"
STAMP="$VENV/.pinpp-setup-$STAMP_SRC-$FLAVOUR"
if [[ -f "$STAMP" ]]; then
  exit 0
fi

log() { echo "[setup_env $(date +%H:%M:%S)] $*"; }
log "creating/updating $VENV (wheel cache: $CACHE)"
mkdir -p "$CACHE"
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=(pip_quiet)
# This machine's pip config lists optional local indexes that may be absent; hide those warnings only.
pip_quiet() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
"${PIP[@]}" install -q --upgrade pip
# setuptools 80.9.0: newer ones lack pkg_resources, which mmcv's setup.py imports.
"${PIP[@]}" install -q setuptools==80.9.0 wheel ninja "cython>=3" numpy==2.4.6
log "torch"
"${PIP[@]}" install -q $TORCH_PIN

build_mmcv() {
  local work; work="$(mktemp -d)"
  log "building mmcv $MMCV_VERSION from source ($FLAVOUR ops; ~15 min on 2 cores, cached afterwards)"
  "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
  tar -xzf "$work"/mmcv-*.tar.gz -C "$work"
  local src; src="$(find "$work" -maxdepth 1 -type d -name 'mmcv-*' | head -1)"
  # torch >= 2.10 headers need C++20; mmcv hard-codes -std=c++17 (CXXFLAGS cannot override it).
  sed -i 's/-std=c++17/-std=c++20/g' "$src/setup.py"
  local force=0; [[ $FLAVOUR == cuda ]] && force=1
  (cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=$force MAX_JOBS="${MAX_JOBS:-2}" \
     "${PIP[@]}" wheel -q --no-deps --no-build-isolation . -w "$work/out")
  mv "$work"/out/mmcv-*.whl "$CACHE/"
  rm -rf "$work"
}

build_l2l() {
  local work; work="$(mktemp -d)"
  log "building learn2learn $L2L_VERSION (re-cythonized for Python 3.11)"
  "${PIP[@]}" download -q --no-deps --no-build-isolation --no-binary :all: "learn2learn==$L2L_VERSION" -d "$work"
  tar -xzf "$work"/learn2learn-*.tar.gz -C "$work"
  local src; src="$(find "$work" -maxdepth 1 -type d -name 'learn2learn-*' | head -1)"
  for f in "$src"/learn2learn/data/*.pyx; do "$VENV/bin/cython" -3 "$f" >/dev/null; done
  (cd "$src" && "${PIP[@]}" wheel -q --no-deps --no-build-isolation . -w "$work/out")
  mv "$work"/out/learn2learn-*.whl "$CACHE/"
  rm -rf "$work"
}

ls "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl >/dev/null 2>&1 || build_mmcv
ls "$CACHE"/learn2learn-"$L2L_VERSION"-*.whl >/dev/null 2>&1 || build_l2l

log "installing cached wheels and the pinned stack"
"${PIP[@]}" install -q "$CACHE"/mmcv-"$MMCV_VERSION"-*.whl
# learn2learn's metadata pins numpy<2 (and gym/qpth); they work on numpy 2, so no deps.
"${PIP[@]}" install -q --no-deps "$CACHE"/learn2learn-"$L2L_VERSION"-*.whl qpth==0.0.18 gym==0.26.2 gym-notices==0.1.0 cloudpickle
"${PIP[@]}" install -q -r "$ROOT/requirements.txt" $TORCH_PIN
"${PIP[@]}" install -q --no-deps -e "$ROOT"
"$VENV/bin/python" -m ipykernel install --sys-prefix --name pinpp --display-name "Python 3 (pinpp)" >/dev/null
"$VENV/bin/python" - <<'PY'
import torch, torchvision, mmcv, mmdet, learn2learn, pycocotools, timm, pyautoattack, papermill  # noqa: F401
from mmcv.ops import RoIAlign  # noqa: F401  (compiled ops present)
print(f"torch {torch.__version__}, mmcv {mmcv.__version__}, mmdet {mmdet.__version__}")
PY
rm -f "$VENV"/.pinpp-setup-*
touch "$STAMP"
log "done"
