#!/usr/bin/env bash
# The main job, headless: set up (if needed), then run the pipeline demo on the bundled real
# Aperio slide and write its outputs (overview PNG, project, masks, metrics) to OUT (default ./out).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HISTO_WSSS_DATA=${HISTO_WSSS_DATA:-$(cd .. && pwd)/shared/data}
exec .venv/bin/histo-wsss demo "${1:-out}"
