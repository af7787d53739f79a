#!/usr/bin/env bash
# Device check for a lent GPU/TPU (issue 20): one command, <= 8 minutes on
# one GPU, everything under $OUT or --out. `--smoke` runs it on CPU (< 3 min).
#   bash benchmarks/device_check.sh --out DIR [--smoke]
# Details: benchmarks/device_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -d .venv && -z "${VIRTUAL_ENV:-}" ]]; then . .venv/bin/activate; fi
exec python -m benchmarks.device_check "$@"
