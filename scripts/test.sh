#!/usr/bin/env bash
# Install txkernel with its test dependencies and run the whole test suite,
# slow system tests included. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/ruff check kernel tests
exec .venv/bin/python -m pytest "$@"
