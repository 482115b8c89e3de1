"""Per-example gradients: the primitive that PEFs, gradient clustering, sign patterns and dataset-level
Fishers are built on.

Two methods, one result. Linear maps (attention, MLP and unembedding weights and biases) go through the hook
trick of ``linear_grads``: captured activations and one batched backward pass. Every other parameter goes
through ``torch.func``: ``vmap`` over sequences of ``jacrev`` over the objective's outputs, with only those
parameters as inputs. Either way several target positions of one sequence share its forward pass, and only
the target positions are unembedded (see ``adapters``). The tests check both methods against each other and
against a loop of single-example ``torch.autograd.grad`` calls.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..adapters import ModelAdapter, as_adapter
from ..examples import Examples, TokensLike, resolve_positions
from ..params import ParamSpace
from ..progress import progress_bar
from ..provenance import tensor_fingerprint
from ..store import ShardStore
from ..targets import Position
from .linear_grads import fisher_diagonal, linear_map_grads
from .objectives import Objective, ObjectiveFor
from .workspace import Workspace

GRADS_FORMAT = "npeff_tl.grads"


@dataclass(frozen=True)
class GradBlock:
    """Gradients of examples [start, stop): ``grads[i, j]`` is d output_j / d theta for example start + i."""

    start: int
    stop: int
    grads: Float[Tensor, "batch k size"]
    outputs: Float[Tensor, "batch k"]


def as_examples(examples: Examples | TokensLike, position: Position | None = None, *,
                adapter: ModelAdapter | None = None) -> Examples:
    """``examples`` as ``Examples``: token sequences get ``position`` (default ``"last"``); ``Examples`` keep their
    own positions, and a ``position`` given beside them must resolve to exactly those. With ``adapter``, their
    token ids are checked against its vocabulary."""
    if not isinstance(examples, Examples):
        examples = Examples.from_tokens(examples, "last" if position is None else position)
    elif position is not None:
        seq_index, positions = resolve_positions(position, examples.lengths)
        if not (torch.equal(seq_index, examples.seq_index) and torch.equal(positions, examples.position)):
            raise ValueError(f"position={position!r} disagrees with the target positions the nt.Examples hold "
                             f"(e.g. {examples.position[:4].tolist()}); Examples carry their own positions: leave "
                             "the position out (e.g. Target(classes=...)) or build the Examples with it")
    if adapter is not None and adapter.vocab_size is not None:
        examples.check_vocabulary(adapter.vocab_size)
    if adapter is not None and not adapter.ignores_padding and bool((examples.lengths < examples.tokens.shape[1]).any()):
        raise ValueError("these sequences are padded to different lengths, and the model attends in both directions "
                         "without a padding mask, so the padding would change its predictions; give sequences of "
                         "one length (or one sequence per call)")
    return examples


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


METHODS = ("auto", "hooks", "func")


def hooked_names(adapter: ModelAdapter, names: list[str], method: str) -> list[str]:
    """The parameters whose gradients come from the hook path under ``method``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "func":
        return []
    maps = adapter.linear_maps()
    unsupported = [name for name in names if name not in maps]
    if method == "hooks" and unsupported:
        raise ValueError(
            f"method='hooks' covers linear maps only, not {unsupported[:5]}{'...' if len(unsupported) > 5 else ''}; "
            "use method='auto' (hooks where possible, torch.func for the rest)"
        )
    return [name for name in names if name in maps]


def _func_grads(
    adapter: ModelAdapter, names: list[str], tokens: Tensor, positions: Tensor, aux_grid, objective: Objective
) -> tuple[dict[str, Tensor], Tensor]:
    """torch.func: vmap over sequences of jacrev over the outputs; [seqs, width, k, *shape] per name."""
    params = {name: p.detach() for name, p in adapter.named_parameters().items() if name in names}

    def objective_of_sequence(params, tokens, positions, aux):
        logits = adapter.target_logits(tokens[None], positions[None], params)[0]  # [width, vocab]
        out = objective(logits, aux)
        return out, out

    jacobian = torch.func.vmap(torch.func.jacrev(objective_of_sequence, has_aux=True), in_dims=(None, 0, 0, 0))
    with torch.no_grad():  # the module's own parameters are constants here; no autograd graph for them
        return jacobian(params, tokens, positions, aux_grid)


def batch_grads(
    adapter: ModelAdapter,
    space: ParamSpace,
    examples: Examples,
    index: Int[Tensor, " b"],
    objective: Objective | ObjectiveFor,
    aux: Tensor | dict[str, Tensor] | None,
    method: str = "auto",
    workspace: Workspace | None = None,
    diagonal: bool = False,
) -> tuple[Iterator[tuple[str, Float[Tensor, "b k numel"] | Float[Tensor, "b numel"]]], Float[Tensor, "b k"]]:
    """Per-example gradients of ``objective`` for examples ``index`` (``aux``: their rows of objective data).

    ``objective`` may also be an ``ObjectiveFor``: a function of the batch's logits (detached, [b, vocab])
    that returns the objective, with its aux rows for these examples; the forward pass that gives the logits
    is then the one the gradients use (with hooks), not a second one.

    Returns an iterator of (name, [b, k, numel]) over the parameters of ``space`` in order and the outputs
    [b, k]: one tensor at a time so that callers reduce them without a [b, k, size] concatenation. A tensor
    may live in a reused buffer: it is valid until the next one is produced. ``method``: "hooks" for linear
    maps (``linear_grads``), "func" for ``torch.func``, "auto" for hooks where possible.
    """
    hooked = hooked_names(adapter, space.names, method)  # the callers check the model and method at entry
    on_hooks = set(hooked)
    rest = [name for name in space.names if name not in on_hooks]
    device = adapter.device
    sequences, row, slot, width = sequence_grid(examples.seq_index[index])
    positions = _to_grid(examples.position[index], row, slot, len(sequences), width).to(device)
    tokens = examples.tokens[sequences].to(device)
    row, slot = row.to(device), slot.to(device)
    chosen: list[tuple[Objective, Tensor | dict[str, Tensor]]] = []

    def objective_on_grid(logits: Tensor | None) -> tuple[Objective, Tensor | dict[str, Tensor]]:
        """The objective and its aux on the [seqs, width] grid, chosen once (``logits``: [seqs, width, vocab])."""
        if not chosen:
            picked = objective if isinstance(objective, Objective) else objective(logits[row, slot])
            rows = aux if picked is objective else picked.aux
            chosen.append((picked, _map(rows, lambda c: _to_grid(c.to(device), row, slot, len(sequences), width))))
        return chosen[0]

    if hooked:
        hooked_grads, outputs = linear_map_grads(
            adapter, hooked, tokens, positions, objective_on_grid, row, slot, workspace or Workspace(), diagonal
        )
    if rest:
        logits = None
        if not chosen and not isinstance(objective, Objective):  # no hook pass to choose from: a forward pass
            with torch.no_grad():
                logits = adapter.target_logits(tokens, positions)
        picked, aux_grid = objective_on_grid(logits)
        jac, outputs = _func_grads(adapter, rest, tokens, positions, aux_grid, picked)
    k = outputs.shape[-1]
    if width == 1:  # one example per sequence, in order: views, no copies
        func_grads = {name: jac[name].reshape(len(sequences), k, -1) for name in rest}
        outputs = outputs[:, 0]
    else:
        func_grads = {name: jac[name].reshape(len(sequences), width, k, -1)[row, slot] for name in rest}
        outputs = outputs[row, slot]

    def in_space_order() -> Iterator[tuple[str, Tensor]]:
        for name in space.names:
            if name not in func_grads:
                yield next(hooked_grads)
                continue
            grads = func_grads.pop(name)
            yield name, fisher_diagonal(grads) if diagonal else grads

    return in_space_order(), outputs


def per_example_grads(
    model: nn.Module | ModelAdapter,
    examples: Examples | TokensLike,
    space: ParamSpace,
    objective: Objective,
    *,
    position: Position | None = None,
    batch_size: int = 16,
    store: str | os.PathLike | None = None,
    shard_size: int = 256,
    method: str = "auto",
    progress: bool = True,
) -> Iterator[GradBlock]:
    """Gradients of a per-example objective over ``space``, as dense blocks of at most ``batch_size`` examples.

    ``examples`` is an ``Examples`` or token sequences (then ``position`` picks the target, default the last
    token; given with ``Examples``, it must match their positions). With ``store=DIR``
    every block is also written to DIR in shards of ``shard_size`` examples; a re-run reads finished shards
    back (one block per shard) instead of recomputing them. Blocks come in example order, never straddling a
    shard. ``method``: see ``batch_grads`` (the result does not depend on it beyond rounding).
    """
    adapter = as_adapter(model)
    examples = as_examples(examples, position, adapter=adapter)
    aux = _aux_rows(objective, len(examples))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    space.check_model(adapter)
    hooked_names(adapter, space.names, method)  # a bad method fails here, not at the first batch
    workspace = Workspace()
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
    try:
        ranges = sink.ranges if sink else [(0, len(examples))]
        with progress_bar(total=len(examples), desc="per-example grads", enabled=progress, unit="ex") as bar:
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
                    pieces, outputs = batch_grads(
                        adapter, space, examples, index, objective, _map(aux, lambda c: c[index]), method, workspace
                    )
                    grads = torch.empty(stop - start, outputs.shape[1], space.size, dtype=outputs.dtype, device=outputs.device)
                    for name, piece in pieces:
                        grads[..., slice(*space.offsets[name])] = piece
                    block = GradBlock(start, stop, grads, outputs)
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
    finally:
        if sink:
            sink.close()  # the store's lock goes when the generator finishes or is closed
