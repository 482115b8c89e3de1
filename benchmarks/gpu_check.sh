#!/usr/bin/env bash
# The GPU check: on a machine with CUDA, the CUDA tests, bench_pefs and bench_scale (sized to finish in under
# 8 minutes on one H100/H200), every figure printed; the exit status is 1 if any of them failed.
#
#   benchmarks/gpu_check.sh              (PYTHON=...: a Python whose torch sees the GPU; default python3)
#
# It keeps the machine's own torch (a CUDA build) and adds what npeff-tl needs beside it: where a package index
# is reachable, `pip install -e .[test]`; on a machine without network, wheels of the missing packages placed in
# ./.whl beforehand (benchmarks/RESULTS.md, "GPU check", lists them) are installed into a private folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: $PYTHON has no torch that sees a CUDA device; run this on a GPU machine (PYTHON=... picks the Python)" >&2
    exit 2
fi
if ! "$PYTHON" -c "import transformer_lens, jaxtyping, beartype, pytest, xdist" >/dev/null 2>&1; then
    if [ -d .whl ]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/npeff-tl-site .whl/*.whl
        export PYTHONPATH="/tmp/npeff-tl-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        "$PYTHON" -m pip install -q -e ".[test]"
    fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('gpu_check: torch', torch.__version__, 'on', torch.cuda.get_device_name())"
status=0
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -n 0 tests/integration/test_cuda.py || status=1
timeout 150 "$PYTHON" benchmarks/bench_pefs.py --device cuda || status=1
timeout 240 "$PYTHON" benchmarks/bench_scale.py --device cuda --examples 512 || status=1
echo "gpu_check: done (status $status)"
exit $status
