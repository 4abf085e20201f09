#!/usr/bin/env bash
# One idempotent setup step: virtual environment, the project and its pinned
# dependencies, and, on a machine without a GPU, the libcuda stand-in and the
# local tiny model. A second run only checks and finishes in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${TAPER_VENV:-.venv}
log="$VENV/setup-pip.log"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
# Reinstall only when what pip would install changed.
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.taper-installed" 2>/dev/null)" != "$want" ]; then
    # The pinned stack (sglang, torch's CUDA build and its libraries) takes ~11 GiB in
    # the venv; pip failing half-way with "No space left on device" says less than this.
    free_kib=$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')
    if [ "${free_kib:-0}" -lt $((12 * 1024 * 1024)) ]; then
        echo "[setup] warning: $((free_kib / 1024 / 1024)) GiB free where $VENV lives;" \
             "the install needs about 12 GiB" >&2
    fi
    echo "[setup] installing sglang-taper and its pinned dependencies (a few minutes cold) ..."
    start=$SECONDS
    if ! { "$VENV/bin/python" -m pip install --upgrade pip &&
           "$VENV/bin/python" -m pip install -e ".[dev,bench,router]"; } >"$log" 2>&1; then
        grep -v "^WARNING: Location" "$log" | tail -30
        echo "[setup] pip failed; full log in $log" >&2
        exit 1
    fi
    echo "$want" >"$VENV/.taper-installed"
    echo "[setup] installed in $((SECONDS - start)) s"
fi
"$VENV/bin/taper" setup
