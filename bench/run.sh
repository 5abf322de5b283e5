#!/usr/bin/env bash
# The benchmark's one command: build (or refresh) bench/.venv with the peers
# and this checkout, then measure every system and print the table.
# Arguments go to bench/run.py, e.g.: bash bench/run.sh --quick
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="$(bash "$here/setup_env.sh")"
cd "$(dirname "$here")"
exec "$python" -m bench.run "$@"
