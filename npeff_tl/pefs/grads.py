"""Per-example gradients: the primitive that PEFs, gradient clustering, sign patterns and dataset-level
Fishers are built on.

Method: ``torch.func`` — ``vmap`` over sequences of ``jacrev`` over the objective's outputs, with only the
selected parameters as inputs (the rest are constants). It is module-agnostic (every TL parameter, embeddings
and LayerNorms included), and several target positions of one sequence share its forward pass. Only the
target positions are unembedded (see ``adapters``). The tests check it against a loop of single-example
``torch.autograd.grad`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..adapters import ModelAdapter, as_adapter
from ..examples import Examples, TokensLike
from ..params import ParamSpace
from ..store import ShardStore, tensor_fingerprint
from ..targets import Position
from .objectives import Objective

GRADS_FORMAT = "npeff_tl.grads"


@dataclass(frozen=True)
class GradBlock:
    """Gradients of examples [start, stop): ``grads[i, j]`` is d output_j / d theta for example start + i."""

    start: int
    stop: int
    grads: Float[Tensor, "batch k size"]
    outputs: Float[Tensor, "batch k"]


def as_examples(examples: Examples | TokensLike, position: Position = "last") -> Examples:
    return examples if isinstance(examples, Examples) else Examples.from_tokens(examples, position)


def _map(aux: Tensor | dict[str, Tensor], fn) -> Tensor | dict[str, Tensor]:
    return {key: fn(value) for key, value in aux.items()} if isinstance(aux, dict) else fn(aux)


def _columns(aux: Tensor | dict[str, Tensor]) -> list[Tensor]:
    return list(aux.values()) if isinstance(aux, dict) else [aux]


def _aux_rows(objective: Objective, n_examples: int) -> Tensor | dict[str, Tensor]:
    if objective.aux is None:
        return torch.zeros(n_examples, 1)
    for column in _columns(objective.aux):
        if column.shape[0] != n_examples:
            raise ValueError(f"the objective has data for {column.shape[0]} examples but there are {n_examples}")
    return objective.aux


def sequence_grid(seq_index: Int[Tensor, " b"]) -> tuple[Tensor, Tensor, Tensor, int]:
    """Group a batch of examples by sequence: (unique sequences, row of each example, slot of each example
    within its sequence's positions, the largest number of positions of one sequence)."""
    sequences, row, counts = torch.unique_consecutive(seq_index, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts
    slot = torch.arange(seq_index.shape[0]) - first[row]
    return sequences, row, slot, int(counts.max())


def _to_grid(values: Tensor, row: Tensor, slot: Tensor, n_rows: int, width: int) -> Tensor:
    grid = torch.zeros(n_rows, width, *values.shape[1:], dtype=values.dtype, device=values.device)
    grid[row, slot] = values
    return grid


def batch_target_logits(
    adapter: ModelAdapter, examples: Examples, index: Int[Tensor, " b"]
) -> Float[Tensor, "b vocab"]:
    """Logits at the target positions of examples ``index`` (one forward pass per distinct sequence)."""
    sequences, row, slot, width = sequence_grid(examples.seq_index[index])
    device = adapter.device
    positions = _to_grid(examples.position[index], row, slot, len(sequences), width)
    logits = adapter.target_logits(examples.tokens[sequences].to(device), positions.to(device))
    return logits[row.to(device), slot.to(device)]


def batch_grads(
    adapter: ModelAdapter,
    space: ParamSpace,
    examples: Examples,
    index: Int[Tensor, " b"],
    objective: Objective,
    aux: Tensor | dict[str, Tensor],
) -> tuple[dict[str, Tensor], Float[Tensor, "b k"]]:
    """Per-example gradients of ``objective`` for examples ``index`` (``aux``: their rows of objective data),
    one [b, k, numel] tensor per parameter of ``space``, kept apart so that callers can reduce them without
    one large concatenation."""
    device = adapter.device
    params = {name: p.detach() for name, p in space.check_model(adapter).items()}
    sequences, row, slot, width = sequence_grid(examples.seq_index[index])
    positions = _to_grid(examples.position[index], row, slot, len(sequences), width).to(device)
    aux_grid = _map(aux, lambda column: _to_grid(column.to(device), row, slot, len(sequences), width))

    def objective_of_sequence(params, tokens, positions, aux):
        logits = adapter.target_logits(tokens[None], positions[None], params)[0]  # [width, vocab]
        out = objective(logits, aux)
        return out, out

    jacobian = torch.func.vmap(torch.func.jacrev(objective_of_sequence, has_aux=True), in_dims=(None, 0, 0, 0))
    with torch.no_grad():  # the module's own parameters are constants here; no autograd graph for them
        jac, outputs = jacobian(params, examples.tokens[sequences].to(device), positions, aux_grid)
    n_seq, k = outputs.shape[0], outputs.shape[-1]
    if width == 1:  # one example per sequence, in order: views, no copies
        return {name: jac[name].reshape(n_seq, k, -1) for name in space.names}, outputs[:, 0]
    row, slot = row.to(device), slot.to(device)
    return {name: jac[name].reshape(n_seq, width, k, -1)[row, slot] for name in space.names}, outputs[row, slot]


def per_example_grads(
    model: nn.Module | ModelAdapter,
    examples: Examples | TokensLike,
    space: ParamSpace,
    objective: Objective,
    *,
    position: Position = "last",
    batch_size: int = 16,
    store: str | os.PathLike | None = None,
    shard_size: int = 256,
    progress: bool = True,
) -> Iterator[GradBlock]:
    """Gradients of a per-example objective over ``space``, as dense blocks of at most ``batch_size`` examples.

    ``examples`` is an ``Examples`` or token sequences (then ``position`` picks the target). With ``store=DIR``
    every block is also written to DIR in shards of ``shard_size`` examples; a re-run reads finished shards
    back (one block per shard) instead of recomputing them. Blocks come in example order, never straddling a
    shard.
    """
    adapter = as_adapter(model)
    examples = as_examples(examples, position)
    aux = _aux_rows(objective, len(examples))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sink = None
    if store is not None:
        config = {
            "space": space.to_dict(),
            "objective": type(objective).__name__,
            "examples_sha256": examples.fingerprint(),
            "aux_sha256": tensor_fingerprint(_columns(aux)),
            "model_sha256": tensor_fingerprint(list(adapter.named_parameters().values())),
        }
        sink = ShardStore(store, GRADS_FORMAT, config, len(examples), shard_size)
    ranges = sink.ranges if sink else [(0, len(examples))]
    with tqdm(total=len(examples), desc="per-example grads", disable=not progress, unit="ex") as bar:
        for j, (shard_start, shard_stop) in enumerate(ranges):
            if sink and sink.is_done(j):
                done = sink.read(j)
                yield GradBlock(shard_start, shard_stop, done["grads"], done["outputs"])
                bar.update(shard_stop - shard_start)
                continue
            blocks = []
            for start in range(shard_start, shard_stop, batch_size):
                stop = min(start + batch_size, shard_stop)
                index = torch.arange(start, stop)
                pieces, outputs = batch_grads(adapter, space, examples, index, objective, _map(aux, lambda c: c[index]))
                block = GradBlock(start, stop, torch.cat([pieces[name] for name in space.names], dim=-1), outputs)
                if sink:
                    blocks.append(block)
                else:
                    yield block
                bar.update(stop - start)
            if sink:
                sink.write(j, {"grads": torch.cat([b.grads for b in blocks]), "outputs": torch.cat([b.outputs for b in blocks])})
                yield from blocks
        if sink:
            sink.mark_complete()
