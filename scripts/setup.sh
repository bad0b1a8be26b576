#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh Debian/Ubuntu machine or a workstation:
#   - system libraries napari needs for a real OpenGL context, and Xvfb for headless runs
#   - a virtual environment in .venv with the CPU build of PyTorch installed FIRST
#     (a bare `torch` requirement would otherwise pull a multi-GB CUDA build)
#   - this package, editable, with its test (pytest, pytest-qt, ruff), pretrained-weights, distributed and crf extras
# Set HISTO_WSSS_TORCH to pin another torch (e.g. a CUDA build on a GPU server).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

need_apt=()
command -v Xvfb >/dev/null 2>&1 || need_apt+=(xvfb)
for lib in libEGL.so.1 libGL.so.1 libxkbcommon-x11.so.0 libxcb-cursor.so.0 libxcb-icccm.so.4 libdbus-1.so.3 libfontconfig.so.1; do
  ldconfig -p 2>/dev/null | grep -q "$lib" || { need_apt+=(libgl1 libegl1 libgl1-mesa-dri libxkbcommon-x11-0 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-xinerama0 libxcb-xfixes0 libdbus-1-3 libfontconfig1); break; }
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "[setup] installing system packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
stamp=.venv/.histo-wsss-installed
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  TORCH=${HISTO_WSSS_TORCH:-torch==2.13.0}
  echo "[setup] installing $TORCH (CPU build unless HISTO_WSSS_TORCH says otherwise)"
  "$VPY" -m pip install -q "$TORCH" 2>&1 | grep -v "^WARNING: Location" || true
fi
echo "[setup] installing napari-histo-wsss and its dependencies"
"$VPY" -m pip install -q -e ".[testing,pretrained,distributed]" 2>&1 | grep -v "^WARNING: Location" || true
# the dense CRF of pseudo-mask refinement compiles a C++ extension: without a compiler the rest
# still works and `pseudo-masks` says that its masks are not refined
"$VPY" -m pip install -q -e ".[crf]" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import pydensecrf.densecrf" >/dev/null 2>&1 \
  || echo "[setup] warning: the dense CRF (pydensecrf2) did not build (a C++ compiler is needed); pseudo-masks will not be refined"
"$VPY" -c "import torch, napari, openslide, napari_histo_wsss" || { echo "[setup] install check failed" >&2; exit 1; }
.venv/bin/ruff --version >/dev/null || { echo "[setup] ruff (the linter scripts/test.sh runs, from the testing extra) is missing" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done"
