#!/usr/bin/env bash
# One entry point for people and CI. Each command sets up ./.venv on first use (idempotent: it reinstalls
# only when pyproject.toml or constraints.txt change), then runs:
#   ./run.sh demo [ARGS...]   the main job (npeff-tl demo) on the embedded default model, no downloads
#   ./run.sh test [ARGS...]   the test suite (pytest), offline, one worker per core (-n 0: in this process)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP="$VENV/.npeff-tl-installed"

setup() {
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
        echo "run.sh: installing npeff-tl and its pinned dev environment into $VENV" >&2
        # constraints.txt pins torch==2.13.0 (the local CPU build) and every other dependency.
        "$VENV/bin/python" -m pip install --quiet -c constraints.txt -e ".[dev]"
        echo "$want" > "$STAMP"
    fi
}

# Never reach for a model or dataset hub: everything here runs on local models and data.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) setup; exec "$VENV/bin/npeff-tl" demo "$@" ;;
    test) setup; exec "$VENV/bin/python" -m pytest -n auto --dist worksteal "$@" ;;
    *) echo "usage: ./run.sh demo [ARGS...] | ./run.sh test [PYTEST ARGS...]" >&2; exit 2 ;;
esac
