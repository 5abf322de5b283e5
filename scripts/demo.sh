#!/usr/bin/env bash
# Install txkernel and run the main job: a Monte-Carlo estimate of pi
# computed in parallel.
set -euo pipefail
cd "$(dirname "$0")/.."
TXKERNEL_EXTRAS=test bash scripts/bootstrap.sh
exec .venv/bin/txkernel run -n 4 examples/montecarlo_pi.py "$@"
