#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite under a virtual X server (napari needs OpenGL).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k slide -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HISTO_WSSS_DATA=${HISTO_WSSS_DATA:-$(cd .. && pwd)/shared/data}
.venv/bin/npe2 validate napari-histo-wsss --imports
.venv/bin/ruff check src tests bench  # lint first: seconds, and the run stops on a finding
if [ -n "${DISPLAY:-}" ] && [ "${HISTO_WSSS_USE_DISPLAY:-0}" = 1 ]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec xvfb-run -a -s "-screen 0 1600x1200x24" .venv/bin/python -m pytest "$@"
