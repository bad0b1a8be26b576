#!/usr/bin/env bash
# GPU check, in one call on a fresh GPU machine (about 5-8 minutes; see bench/gpu_check.py):
#   train-cls and train-seg (two short epochs each) with CUDA + AMP, predict the bundled slide,
#   throughput of the model steps on the GPU beside this machine's CPU and the dev machine's.
# Results: $OUT/gpu_check.md (paste into docs/benchmarks.md), $OUT/gpu_check.json, $OUT/logs/.
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --cpu      # dry run of every step on the CPU, tiny sizes (also GPU_CHECK_DEVICE=cpu)
#
# Python: the repository's .venv when it already has torch and this package (a dev machine);
# else a Python that has torch preinstalled (PYTHON, python3, python), or a new virtual
# environment with ${HISTO_WSSS_TORCH:-torch} from the package registry (PyPI's Linux wheel is a
# CUDA build). The headless dependencies (no napari/Qt: the check is CLI only) go into a virtual
# environment outside the repository that sees the preinstalled torch; the package runs from src/.
# Training data: the shared WSSS4LUAD images when HISTO_WSSS_DATA (or ../shared/data) has them,
# else image/mask pairs cut from the bundled slide. Without a usable CUDA device the script says
# so in $OUT/gpu_check.md and exits 3 (nothing is measured on a CPU in its place).
# Without registry access: carry wheels and set pip's own PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DEVICE=${GPU_CHECK_DEVICE:-cuda}
for arg in "$@"; do
  case "$arg" in
    --cpu) DEVICE=cpu ;;
    *) echo "usage: bash bench/gpu_check.sh [--cpu]" >&2; exit 2 ;;
  esac
done
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT"
T0=$(date +%s)
log() { echo "[gpu_check] $*" | tee -a "$OUT/setup.log"; }
fail() {  # the reason in the results file too, so a run that measured nothing says why
  log "NOT RUN: $*"
  printf '## gpu: not run\n\n`bash bench/gpu_check.sh` could not measure anything on %s: %s\n' "$(hostname)" "$*" > "$OUT/gpu_check.md"
  exit 3
}
log "device $DEVICE, results in $OUT"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$OUT/setup.log" 2>&1

has() { "$1" -c "import torch${2:+, $2}" >/dev/null 2>&1; }
PY=""
if [ -x .venv/bin/python ] && has .venv/bin/python napari_histo_wsss &&
   { [ "$DEVICE" = cpu ] || .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }; then
  PY=$ROOT/.venv/bin/python  # a dev machine's environment (its torch sees the GPU, or this is the CPU dry run)
else
  BASE=""
  for cand in ${PYTHON:-} python3 python; do
    if command -v "$cand" >/dev/null 2>&1 && has "$cand"; then BASE=$(command -v "$cand"); break; fi
  done
  VENV=${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/histo-wsss-gpu-venv}
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  if [ -n "$BASE" ]; then
    log "torch found in $BASE: $("$BASE" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    [ -x "$VENV/bin/python" ] || "$BASE" -m venv --system-site-packages "$VENV" || fail "cannot create a virtual environment with $BASE"
  else
    BASE=$(command -v python3 || command -v python) || fail "no Python found"
    [ -x "$VENV/bin/python" ] || "$BASE" -m venv "$VENV" || fail "cannot create a virtual environment with $BASE"
    TORCH=${HISTO_WSSS_TORCH:-torch}
    log "no torch preinstalled: pip install $TORCH (a CUDA build from PyPI; set HISTO_WSSS_TORCH to pin one)"
    "$VENV/bin/python" -m pip install -q "$TORCH" >> "$OUT/setup.log" 2>&1 || fail "pip install $TORCH failed (no registry access?); see setup.log"
  fi
  PY=$VENV/bin/python
  # the headless dependencies pyproject lists (less torch and the GUI: napari, Qt); the package
  # itself runs from src/ (no build step, nothing to download for it)
  DEPS=$("$PY" - <<'EOF2'
import re
text = open("pyproject.toml").read()
block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
gui = {"torch", "napari", "magicgui", "qtpy", "npe2"}
print(" ".join(d for d in re.findall(r'"([^"]+)"', block) if re.split(r"[<>=\[ ;]", d)[0].lower() not in gui))
EOF2
) || fail "cannot read the dependencies in pyproject.toml"
  log "pip install $DEPS (no download for what is already there)"
  # shellcheck disable=SC2086
  "$PY" -m pip install -q $DEPS >> "$OUT/setup.log" 2>&1 || fail "pip install of the dependencies failed (no registry access?); see setup.log"
  export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import torch, napari_histo_wsss" 2>>"$OUT/setup.log" || fail "torch or napari_histo_wsss does not import with $PY; see setup.log"
log "python $PY ($(( $(date +%s) - T0 )) s of set-up): $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA build", torch.version.cuda, "GPU available", torch.cuda.is_available())')"

EXTRA=()
if [ "$DEVICE" = cpu ]; then
  EXTRA=(--tiny)
else
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    fail "CUDA is not available to torch $("$PY" -c 'import torch; print(torch.__version__, "(CUDA build", torch.version.cuda, ")")') on this machine"
fi
# what is left of the 8 minutes after set-up, less a margin for writing the results
BUDGET=$(( ${GPU_CHECK_BUDGET_S:-450} - ($(date +%s) - T0) ))
[ "$BUDGET" -gt 60 ] || fail "set-up took $(( $(date +%s) - T0 )) s, no time left to measure"
"$PY" bench/gpu_check.py --device "$DEVICE" --out "$OUT" --budget-s "$BUDGET" "${EXTRA[@]}"
rc=$?
log "done in $(( $(date +%s) - T0 )) s (exit $rc): $OUT/gpu_check.md"
exit $rc
