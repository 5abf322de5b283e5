#!/usr/bin/env bash
# Create (or refresh) the benchmark's own environment, bench/.venv: the peer
# systems pinned in bench/requirements.txt, from PyPI, plus this checkout of
# txkernel. Kept apart from the project's .venv so the peers never leak into
# the test environment. Safe to run repeatedly; prints the venv's python path.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="$here/.venv"
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

if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
fi

# Reinstall the requirements only when they changed since the last install.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$venv/bin/python" -m pip install -q -r "$here/requirements.txt" >&2
    echo "$want" >"$stamp"
fi

# This checkout, reinstalled every time so the benchmark measures the code in
# the working tree (a regular install, so twisted/plugins/ lands in Twisted's
# plugin package). Its dependencies come first, then the package itself. If
# the checkout cannot be built, the peers can still be measured: warn only.
if ! "$venv/bin/python" -m pip install -q "$root" >&2 ||
    ! "$venv/bin/python" -m pip install -q --force-reinstall --no-deps "$root" >&2; then
    echo "warning: could not install this checkout into $venv;" \
        "txkernel workloads will run from the source tree if they can" >&2
fi

echo "$venv/bin/python"
