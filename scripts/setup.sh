#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for whisper-toolkit (idempotent; root or sudo for apt).
#
#   bash scripts/setup.sh            # system packages + .venv with the toolkit and its test tools
#
# 1. apt: espeak-ng (test/demo speech), python3-venv when a venv must be made.
# 2. .venv: torch==2.13.0 FIRST (the pin; with no torch installed, a bare `torch` requirement
#    would pull the newest CUDA build), then `pip install -e ".[dev,deepspeed,lowmem]"`.
# Set TOOLKIT_SKIP_APT=1 to skip step 1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n==> %s\n' "$*" >&2; }
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else echo "error: need root (or sudo) to run: $*" >&2; exit 1
    fi
}

if [ "${TOOLKIT_SKIP_APT:-0}" != 1 ]; then
    missing=()
    command -v espeak-ng >/dev/null 2>&1 || missing+=(espeak-ng)
    if [ ! -x .venv/bin/python ]; then
        command -v python3 >/dev/null 2>&1 || missing+=(python3)
        # Debian's python3 has no ensurepip (so no `python3 -m venv`) without python3-venv.
        python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing system packages: ${missing[*]}"
        as_root apt-get update -qq
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    python3 -m venv .venv
fi
PY=.venv/bin/python
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    say "pip install torch==2.13.0"
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q torch==2.13.0
fi
if ! "$PY" -c 'import toolkit.cli, accelerate, jiwer, soxr, soundfile, pytest, deepspeed, peft, bitsandbytes' >/dev/null 2>&1; then
    say 'pip install -e ".[dev,deepspeed,lowmem]"'
    "$PY" -m pip install -q -e ".[dev,deepspeed,lowmem]"
fi
say "ready: $("$PY" -c 'import torch, transformers, accelerate; print(f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}")')"
