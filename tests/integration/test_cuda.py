"""The GPU gives the CPU's results. These tests run only where CUDA is available; the rest of the suite never
needs a GPU (the CPU paths are checked against their oracles there)."""

import pytest
import torch

from helpers.models import make_model
from npeff_tl import AnswerLogProb, ParamSpace, Target, TopK, compute_pefs, per_example_grads

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SPACE = ["blocks.*.attn.W_[QKV]", "blocks.*.mlp.W_*", "blocks.0.ln2.w", "unembed.b_U"]
TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-14), torch.float32: dict(rtol=1e-4, atol=1e-7)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["diagonal", "lowrank"])
def test_pefs_on_cuda_equal_the_cpu_result(tokens, kind, dtype):
    model = make_model(dtype)
    space = ParamSpace(model, include=SPACE)
    target = Target("last", TopK(3))
    nnz = space.size * (3 if kind == "lowrank" else 1)  # everything kept: near-ties cannot swap entries in or out
    on_cpu = compute_pefs(model, tokens, space, target, kind, nnz=nnz, batch_size=4, progress=False)
    on_gpu = compute_pefs(model.to("cuda"), tokens, space, target, kind, nnz=nnz, batch_size=4, progress=False)
    assert on_gpu.values.device.type == "cpu"  # results come back to the CPU, like stored ones
    torch.testing.assert_close(on_gpu.to_dense(), on_cpu.to_dense(), **TOLERANCE[dtype])
    torch.testing.assert_close(on_gpu.norms, on_cpu.norms, rtol=1e-6, atol=0)
    torch.testing.assert_close(on_gpu.dataset_fisher, on_cpu.dataset_fisher, **TOLERANCE[dtype])
    assert torch.equal(on_gpu.per_example["class_ids"], on_cpu.per_example["class_ids"])
    if kind == "diagonal":
        assert (on_gpu.values[:, :-1] >= on_gpu.values[:, 1:]).all()  # descending on the GPU too


def test_per_example_grads_on_cuda_equal_the_cpu_result(tokens):
    model = make_model(torch.float64)
    space = ParamSpace(model)  # every parameter: hook path and torch.func path
    objective = AnswerLogProb(torch.arange(len(tokens)) % 23)
    on_cpu = torch.cat([b.grads for b in per_example_grads(model, tokens, space, objective, progress=False)])
    model.to("cuda")
    on_gpu = torch.cat([b.grads.cpu() for b in per_example_grads(model, tokens, space, objective, progress=False)])
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-9, atol=1e-13)
