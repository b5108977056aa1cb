#!/bin/sh
# Run one pipeline stage, `python -m pipeline.<stage> [args]`, with the project's Python, whatever PATH holds:
# $VAE_PYTHON if set, else the repository's .venv (what `make setup` creates), else python3 on PATH (a container
# image that installed the project system-wide). dvc.yaml calls it, so `.venv/bin/dvc repro` works as typed.
set -e
stage="$1"
shift
root="$(cd "$(dirname "$0")/.." && pwd)"
if [ -n "$VAE_PYTHON" ]; then
    python="$VAE_PYTHON"
elif [ -x "$root/.venv/bin/python" ]; then
    python="$root/.venv/bin/python"
else
    python="$(command -v python3 || command -v python)"
fi
exec "$python" -m "pipeline.$stage" "$@"
