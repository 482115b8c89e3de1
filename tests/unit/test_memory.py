"""Memory estimates: within 25% of the peak measured in a fresh process, for PEF computation and both
decompositions on three configurations each; the batch-size picker agrees with the estimates."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import npeff_tl as nt
from npeff_tl.memory import MemoryEstimate, batch_size_for, estimate_memory

WORKER = Path(__file__).parents[1] / "helpers" / "memory_worker.py"

PEF_CONFIGS = [
    {"stage": "pefs", "layers": 2, "d_model": 256, "heads": 4, "vocab": 500, "seq_len": 32, "n": 24, "classes": 4,
     "kind": "diagonal", "nnz": 16384, "batch": 12},
    {"stage": "pefs", "layers": 3, "d_model": 384, "heads": 6, "vocab": 1000, "seq_len": 24, "n": 8, "classes": 8,
     "kind": "diagonal", "nnz": 32768, "batch": 4},
    {"stage": "pefs", "layers": 2, "d_model": 256, "heads": 4, "vocab": 500, "seq_len": 32, "n": 16, "classes": 4,
     "kind": "lowrank", "nnz": 16384, "batch": 8},
]
DECOMPOSITION_CONFIGS = [
    {"stage": "dnpeff", "n": 128, "nnz": 8192, "size": 500_000, "rank": 24},
    {"stage": "dnpeff", "n": 512, "nnz": 4096, "size": 200_000, "rank": 32},
    {"stage": "dnpeff", "n": 256, "nnz": 2048, "size": 1_000_000, "rank": 8},
    {"stage": "lrm_npeff", "n": 128, "nnz": 8192, "size": 500_000, "rank": 24},
    {"stage": "lrm_npeff", "n": 512, "nnz": 4096, "size": 200_000, "rank": 32},
    {"stage": "lrm_npeff", "n": 256, "nnz": 8192, "size": 300_000, "rank": 8},
]
needs_proc = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                                reason="peak resident memory is read from Linux /proc")


def _config_id(config: dict) -> str:
    return f"{config['stage']}-{config.get('kind', '')}{config['n']}x{config['nnz']}"


def _estimate_within_25_percent(config: dict) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(WORKER), json.dumps(config)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ratio = figures["estimated"] / figures["measured"]
    assert figures["measured"] > 50e6  # large enough that the tensors, not the process, dominate
    assert 0.75 <= ratio <= 1.25, figures


@needs_proc
@pytest.mark.parametrize("config", PEF_CONFIGS, ids=_config_id)
def test_the_pef_estimate_is_within_25_percent_of_the_measured_peak(config):
    _estimate_within_25_percent(config)


@needs_proc
@pytest.mark.parametrize("config", DECOMPOSITION_CONFIGS, ids=_config_id)
def test_the_decomposition_estimate_is_within_25_percent_of_the_measured_peak(config):
    _estimate_within_25_percent(config)


def test_the_batch_size_picker_takes_the_largest_batch_that_fits(model64):
    space = nt.ParamSpace(model64, include=["blocks.*.mlp.W_*"])
    settings = {"model": model64, "space": space, "target": nt.Target("last", nt.TopK(3)), "kind": "diagonal",
                "nnz": 100, "n_examples": 50, "seq_len": 9}
    sizes = {b: estimate_memory("pefs", batch_size=b, **settings).bytes for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)}
    assert all(sizes[b] < sizes[2 * b] for b in (1, 2, 4, 8, 16, 32, 64, 128))  # more examples, more memory
    budget = (sizes[8] + sizes[16]) // 2
    assert batch_size_for(budget, **settings) == 8
    with pytest.raises(ValueError, match="even batch size 1 needs about"):
        batch_size_for(sizes[1] // 2, **settings)


def test_an_estimate_names_its_terms_and_checks_its_stage():
    estimate = estimate_memory("dnpeff", n_examples=100, nnz=1000, n_columns=5000, rank=8)
    assert isinstance(estimate, MemoryEstimate) and estimate.bytes == sum(estimate.parts.values()) > 0
    assert "MiB" in str(estimate) or "KiB" in str(estimate)
    bigger = estimate_memory("dnpeff", n_examples=200, nnz=1000, n_columns=5000, rank=8)
    assert bigger.bytes > estimate.bytes
    with pytest.raises(ValueError, match="unknown stage 'nmf'"):
        estimate_memory("nmf", n_examples=1, nnz=1, n_columns=1, rank=1)
