"""How much memory a stage will need, before it runs: ``estimate_memory("pefs" | "dnpeff" | "lrm_npeff", ...)``.

The estimates add up the tensors the code holds at once, phase by phase (counted from the code: what each
step allocates and what is still alive), and take the largest phase: the memory a stage adds to a process
that already holds the model and the PEFs. The activations a model saves for backward are counted by running
it on two dummy sequences. ``batch_size_for`` picks the largest PEF batch that fits a budget. On CPU the
measured peaks (resident memory, with glibc returning freed blocks: ``MALLOC_MMAP_THRESHOLD_=65536``) are
within 25% of the estimates on the configurations of ``tests/unit/test_memory.py``; ``MemoryEstimate.parts`` names
the terms so that a surprise can be traced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import as_adapter
from .decomp.variants import VARIANTS
from .params import ParamSpace
from .pefs.kinds import PEFKind, pef_kind
from .pefs.linear_grads import requiring_grad_only
from .targets import Target

FLOAT64 = 8
INDEX = 8  # int64 indices of sparse matrices and sorts
STORED_INDEX = 4  # int32 parameter indices in PEF rows


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak bytes a stage adds, and the terms of its largest phase."""

    bytes: int
    parts: dict[str, int]

    def __str__(self) -> str:
        largest = sorted(((size, name) for name, size in self.parts.items() if size > 0), reverse=True)[:3]
        return f"{_human(self.bytes)} (largest: " + ", ".join(f"{name} {_human(size)}" for size, name in largest) + ")"


def available_bytes() -> int | None:
    """Memory the machine can still give this process (Linux MemAvailable; None where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def shortfall(estimate: MemoryEstimate, what: str) -> str | None:
    """A warning when ``estimate`` exceeds the memory available now (None when it fits or nothing is known)."""
    free = available_bytes()
    if free is None or estimate.bytes <= free:
        return None
    return (f"{what}: about {_human(estimate.bytes)} of memory needed but only {_human(free)} available; lower the "
            "batch size or nnz, or select fewer parameters, before it runs out of memory")


def _human(size: int | float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _peak(phases: dict[str, dict[str, int | float]]) -> MemoryEstimate:
    name = max(phases, key=lambda p: sum(phases[p].values()))
    parts = {k: int(v) for k, v in phases[name].items()}
    return MemoryEstimate(sum(parts.values()), parts)


def estimate_pefs_memory(
    model: nn.Module,
    space: ParamSpace,
    target: Target,
    kind: str | PEFKind,
    *,
    batch_size: int,
    nnz: int,
    n_examples: int,
    seq_len: int,
    shard_size: int = 1024,
    dtype: torch.dtype | None = None,
    activations: tuple[int, int] | None = None,
) -> MemoryEstimate:
    """Peak memory of ``compute_pefs`` with a store (``seq_len``: the longest sequence; one target position per
    sequence; ``dtype``: of the stored values, by default the model's). Parameters outside the adapter's linear
    maps (the ``torch.func`` path) are counted at twice their per-example gradients. Runs the model on two
    dummy sequences to count the activations its architecture saves for backward (``activations``: that
    count from ``_activations``, when several estimates share it)."""
    kind = pef_kind(kind)
    adapter = as_adapter(model)
    cfg = model.cfg
    f = torch.tensor([], dtype=dtype or adapter.dtype).element_size()
    b, k, T, P = batch_size, target.classes.max_classes, seq_len, space.size
    maps = adapter.linear_maps()
    params = adapter.named_parameters()
    numel = {name: space.offsets[name][1] - space.offsets[name][0] for name in space.names}
    largest = max(numel.values())
    hooked = {name for name in space.names if name in maps}
    d_out = sum(_output_width(name, tuple(params[name].shape)) for name in hooked
                if not (name.rsplit(".", 1)[-1].startswith("b_") and name.replace(".b_", ".W_") in hooked))
    func = sum(numel[name] for name in space.names if name not in maps)
    saved, fixed = activations if activations is not None else _activations(adapter, space, seq_len)
    per_batch = {
        # D-PEFs take the classes one at a time through one buffer; LRM-PEFs keep all k
        "per-example gradients (largest tensor)": (k if kind.uses_factors else 1) * b * largest * f,
        "diagonal of the largest tensor": b * largest * f,
        "output gradients of the hooked maps": k * b * T * d_out * f,
        "activations saved for backward": b * saved + fixed,
        "batched backward (one layer's gradients per class)": k * b * saved / cfg.n_layers,
        "torch.func gradients": 2 * k * b * func * f,
    }
    if nnz == kind.choice_size(P, k):  # everything is kept: one row buffer, nothing selected or sorted
        per_batch["all entries of the rows"] = b * nnz * f
    else:
        per_batch["top-k candidates"] = b * 3 * nnz * (2 * f + INDEX)
    rows = nnz * (f + STORED_INDEX)
    shard = min(shard_size, n_examples) * rows
    compute = {**per_batch, "Fisher sum": P * FLOAT64, "shard being filled": shard}
    load = {"Fisher sums and dataset Fisher": 3 * P * FLOAT64, "last shard": 2 * shard,
            "result (read and concatenated)": 2 * n_examples * rows,
            "gradient buffers (kept to the end)": per_batch["per-example gradients (largest tensor)"]
            + per_batch["diagonal of the largest tensor"]}
    return _peak({"compute": compute, "load": load})


def _activations(adapter, space: ParamSpace, seq_len: int) -> tuple[int, int]:
    """(bytes saved for backward per sequence, bytes that do not grow with the batch), from 1 and 2 sequences."""
    one, two = (_saved_activation_bytes(adapter, space, seq_len, n) for n in (1, 2))
    return two - one, 2 * one - two


def _saved_activation_bytes(adapter, space: ParamSpace, seq_len: int, n_sequences: int) -> int:
    """Bytes autograd saves for backward in one forward pass of ``n_sequences`` sequences of ``seq_len``
    tokens, counted with saved-tensor hooks (the model's own parameters excluded): what the model's
    architecture keeps, whatever it is."""
    own = {(p.data_ptr(), p.numel()) for p in adapter.model.parameters()}
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.data_ptr(), t.numel())] = t.numel() * t.element_size()
        return t

    tokens = torch.zeros(n_sequences, seq_len, dtype=torch.long, device=adapter.device)
    positions = torch.full((n_sequences, 1), seq_len - 1, dtype=torch.long, device=adapter.device)
    with torch.enable_grad(), requiring_grad_only(adapter, space.names), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter.target_logits(tokens, positions)
    return sum(size for key, size in seen.items() if key not in own)


def _output_width(name: str, shape: tuple[int, ...]) -> int:
    """Features per position of a linear map's output, from its TL parameter shape: [heads, d_in, d_head] ->
    heads x d_head (W_O and its bias: d_model), [d_in, d_out] -> d_out, a bias [..., d_out] -> its size."""
    if name.endswith(("W_O", "b_O")):
        return shape[-1]
    if len(shape) == 3:
        return shape[0] * shape[2]
    if name.rsplit(".", 1)[-1].startswith("b_"):
        return math.prod(shape)
    return shape[-1]


def estimate_decomposition_memory(
    kind: str,
    *,
    n_examples: int,
    nnz: int,
    n_columns: int,
    rank: int,
    classes: int = 1,
    dtype: torch.dtype = torch.float32,
) -> MemoryEstimate:
    """Peak memory of ``DNPEFF(rank).fit`` (kind "diagonal") or ``LRMNPEFF(rank).fit`` ("lowrank") on PEFs of
    ``n_examples`` x ``nnz`` stored entries whose kept columns number ``n_columns`` (at most the space size;
    the space size is a safe bound), with ``classes`` rows per example (low-rank)."""
    if kind not in ("diagonal", "lowrank"):
        raise ValueError(f"kind must be 'diagonal' or 'lowrank', got {kind!r}")
    f = torch.tensor([], dtype=dtype).element_size()
    E = n_examples * nnz
    rows = n_examples * (classes if kind == "lowrank" else 1)
    rm = rank * n_columns
    entries = E * (2 * INDEX + f)  # (row, column, value) of every entry
    csr = E * (INDEX + f)  # one CSR copy of the matrix: column indices and values
    # prepare: the entries of kept columns found by a search (each entry's position among them), then the column
    # blocks and the transposed CSR being sorted into place
    select = {"entries, before and after": 2 * entries, "column search": n_columns * INDEX + E * (INDEX + 1)}
    build = {"entries": entries, "column blocks": csr,
             "transposed CSR: sort key, order, sorted copies": E * 2 * INDEX + entries + csr}
    prepare = max((select, build), key=lambda p: sum(p.values()))
    if kind == "lowrank":
        from .decomp.matrix import gram_chunk_entries

        chunk = gram_chunk_entries(classes)
        phases = [prepare,
                  # entries of each (example, class) before the padding classes are dropped
                  {"entries with their classes": 2 * entries + E * (classes + INDEX + 1)},
                  # the class x class Gram matrices: one chunk's keys, classes, values and outer products
                  {"entries and their examples": entries + E * INDEX,
                   "Gram chunk": chunk * (classes * classes * FLOAT64 + classes * FLOAT64 + 8 * INDEX)}]
        prepare = max(phases, key=lambda p: sum(p.values()))
    matrix = 2 * csr + rows * INDEX
    if kind == "diagonal":
        # H^T and W^T A, and the H update's two temporaries (its denominator and the new H)
        fit = {"matrix": matrix, "components, W^T A and the update's temporaries": 4 * rm * f}
    else:
        # beside G and G^T, a G step holds three more [columns x rank] arrays at once: the gradient's two
        # products and their difference, or the gradient, the stepped copy and its increment
        fit = {"matrix": matrix, "components and their transpose": 2 * rm * f,
               "gradient and step arrays": 3 * rm * f, "per-row products (A G^T, W A G^T)": 4 * rows * rank * f}
    init = {"matrix": matrix, "initial draw (float64) and its float32 copies": rm * (FLOAT64 + 2 * f)}
    return _peak({"prepare": prepare, "fit": fit, "initial factors": init})


def estimate_memory(stage: str, **settings) -> MemoryEstimate:
    """``estimate_pefs_memory`` for stage "pefs", ``estimate_decomposition_memory`` for "dnpeff" (diagonal)
    and "lrm_npeff" (low-rank)."""
    if stage == "pefs":
        return estimate_pefs_memory(**settings)
    if stage in VARIANTS:
        return estimate_decomposition_memory(VARIANTS[stage].pefs.name, **settings)
    raise ValueError(f"unknown stage {stage!r}; choose from pefs, {', '.join(VARIANTS)}")


def batch_size_for(budget_bytes: int, **settings) -> int:
    """The largest PEF batch size (a power of two, at most 256) whose estimate fits ``budget_bytes``."""
    activations = _activations(as_adapter(settings["model"]), settings["space"], settings["seq_len"])
    estimates = {b: estimate_pefs_memory(batch_size=b, activations=activations, **settings)
                 for b in (1, 2, 4, 8, 16, 32, 64, 128, 256)}
    best = max((b for b, estimate in estimates.items() if estimate.bytes <= budget_bytes), default=None)
    if best is None:
        smallest = estimates[1]
        raise ValueError(f"even batch size 1 needs about {smallest} of memory, over the budget of "
                         f"{_human(budget_bytes)}; lower nnz or choose fewer parameters")
    return best
