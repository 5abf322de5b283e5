#!/usr/bin/env bash
# Shared setup for the quick-start scripts: make sure Python can build a
# virtual environment (installing Debian's python3-venv when run as root on a
# fresh machine), create .venv in the checkout, and install txkernel into it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev >/dev/null
    else
        echo "python3 cannot create virtual environments: install python3-venv" >&2
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# A regular (not editable) install, so twisted/plugins/ lands in Twisted's
# plugin package; tests still import kernel/ from the checkout.
.venv/bin/python -m pip install -q ".[${TXKERNEL_EXTRAS:-test}]"
