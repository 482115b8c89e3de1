"""Per-example gradients of linear maps from captured activations (the "hook trick").

For a parameter used as y = x @ W at every position, the gradient of example e's output j is
sum_t x_t^T dy_t, where dy is the gradient of that output at y. So one forward pass with hooks capturing x and
y, one batched backward pass giving dy for every output, and one matmul per class and parameter give exact
per-example gradients, without the copies of ``vmap(jacrev)``. The matmuls write into reused buffers (fresh
large allocations are slow). Which parameters qualify is the adapter's call (``ModelAdapter.linear_maps``);
``grads.py`` handles the others with ``torch.func``, which also serves as this path's oracle in the tests.

D-PEFs need only sum_c g_c^2, and it can be had without the per-class gradients: where an example's dy is
nonzero at one position t only (every position-wise map of the last block, whose outputs reach the loss only at
the target), its gradient for class c is the outer product x_t^T dy_{c,t}, so sum_c g_c^2 = x_t^2 (sum_c dy_{c,t}^2)
elementwise: one product per entry instead of k matmuls, k squares and k buffers the size of the weight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..adapters import LinearMap, ModelAdapter
from .objectives import Objective
from .workspace import Workspace


@contextmanager
def _recording(modules: list[nn.Module]) -> Iterator[dict[nn.Module, list[tuple]]]:
    """Record (args, kwargs, output) of every call of ``modules`` while the context is open."""
    calls: dict[nn.Module, list[tuple]] = {module: [] for module in modules}

    def record(module, args, kwargs, output):
        calls[module].append((args, kwargs, output))

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in modules]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def requiring_grad_only(adapter: ModelAdapter, names: list[str]) -> Iterator[None]:
    """Make the parameters behind ``names``, and no other parameter of the model, require grad for a while
    (frozen models too): their outputs enter the graph, and what runs before the first of them is not recorded
    for backward."""
    wanted = {id(p) for p in adapter.parameters_behind(names)}
    flipped = [p for p in adapter.model.parameters() if p.requires_grad != (id(p) in wanted)]
    for p in flipped:
        p.requires_grad_(not p.requires_grad)
    try:
        yield
    finally:
        for p in flipped:
            p.requires_grad_(not p.requires_grad)


def _with_head_axis(t: Tensor, axis: int) -> Tensor:
    """[..., pos, d] -> [..., pos, 1, d]; tensors that already have a head axis are returned as they are."""
    return t if t.ndim == axis + 2 else t.unsqueeze(axis)


def fisher_diagonal(factors: Float[Tensor, "b k n"], out: Float[Tensor, "b n"] | None = None
                    ) -> Float[Tensor, "b n"]:
    """The D-PEF entries f = sum_c u_c^2 of factor columns ``factors[:, c]``, written into ``out`` (a new tensor
    by default)."""
    out = factors.new_empty(factors.shape[::2]) if out is None else out
    torch.mul(factors[:, 0], factors[:, 0], out=out)
    for c in range(1, factors.shape[1]):
        out.addcmul_(factors[:, c], factors[:, c])
    return out


def single_positions(dy: Float[Tensor, "k b pos head d_out"]) -> Int[Tensor, " b"] | None:
    """Per example, the one position where its ``dy`` is nonzero (0 where it is zero everywhere), or None if some
    example has several such positions."""
    active = dy.ne(0).flatten(3).any(3).any(0)  # [b, pos]
    if bool((active.sum(1) > 1).any()):
        return None
    return active.to(torch.uint8).argmax(1)


def linear_map_grads(
    adapter: ModelAdapter,
    names: list[str],
    tokens: Int[Tensor, "seqs pos"],
    positions: Int[Tensor, "seqs width"],
    objective_on_grid: Callable[[Tensor], tuple[Objective, Tensor | dict[str, Tensor]]],
    row: Int[Tensor, " b"],
    slot: Int[Tensor, " b"],
    workspace: Workspace,
    diagonal: bool = False,
) -> tuple[Iterator[tuple[str, Float[Tensor, "b k numel"] | Float[Tensor, "b numel"]]], Float[Tensor, "seqs width k"]]:
    """Per-example gradients of an objective for the parameters ``names`` (all in ``adapter.linear_maps()``).

    ``objective_on_grid`` gives the objective and its aux on the [seqs, width] grid of target slots from the
    logits there (detached). Example e is target slot ``slot[e]`` of sequence ``row[e]``. Returns an
    iterator of (name, [b, k, numel]) in the order of ``names`` and the objective's outputs; each tensor lives
    in a reused buffer and is valid until the next one is produced. With ``diagonal``, the iterator gives the
    sums over outputs of the squared gradients, [b, numel], instead (see the module's docstring).
    """
    every_map = adapter.linear_maps()  # once: a bridge adapter rebuilds the dict on each call
    maps: dict[str, LinearMap] = {name: every_map[name] for name in names}
    modules = list({c.module: None for m in maps.values() for c in (m.output, m.input) if c is not None})
    with torch.enable_grad(), requiring_grad_only(adapter, names), _recording(modules) as calls:
        logits = adapter.target_logits(tokens, positions)
        objective, aux_grid = objective_on_grid(logits.detach())
        outputs = objective(logits, aux_grid)  # [seqs, width, k]
    for module, seen in calls.items():
        if len(seen) != 1:
            raise RuntimeError(
                f"{type(module).__name__} ran {len(seen)} times in one forward pass; the hook path needs exactly "
                "one call per module. Use method='func' for this model."
            )

    def captured(capture) -> Tensor:
        return capture.select(*calls[capture.module][0])

    ys = list({id(y): y for y in (captured(m.output) for m in maps.values())}.values())
    n_seqs, width, k = outputs.shape
    n_out = width * k
    flat = outputs.reshape(n_seqs, n_out)
    basis = torch.eye(n_out, dtype=flat.dtype, device=flat.device)[:, None, :].expand(n_out, n_seqs, n_out)
    dys = torch.autograd.grad(flat, ys, basis, is_grads_batched=True, materialize_grads=True)
    dy_of = {id(y): dy for y, dy in zip(ys, dys)}  # [width * k, seqs, pos, (head), d_out]
    one_per_sequence = width == 1
    outputs = outputs.detach()

    def per_example(dy: Tensor) -> Tensor:  # [k, b, pos, head, d_out]
        dy = _with_head_axis(dy, 3).unflatten(0, (width, k))
        return dy[0] if one_per_sequence else dy[slot, :, row].transpose(0, 1)

    def grads() -> Iterator[tuple[str, Tensor]]:
        for name in names:
            m = maps[name]
            dy = dy_of[id(captured(m.output))]
            dy = per_example(dy.unflatten(-1, (m.output_heads, -1)) if m.output_heads else dy)
            b = dy.shape[1]
            if m.input is None:  # bias: sum over positions
                g = dy.sum(2).reshape(k, b, -1).transpose(0, 1)
                yield name, fisher_diagonal(g) if diagonal else g
                continue
            x = _with_head_axis(captured(m.input).detach(), 2)  # [seqs, pos, head, d_in]
            x = x if one_per_sequence else x[row]
            heads, d_in, d_out = max(x.shape[2], dy.shape[3]), x.shape[3], dy.shape[4]
            at = single_positions(dy) if diagonal else None
            if at is not None:  # sum_c (x_t^T dy_ct)^2 = x_t^2 sum_c dy_ct^2
                e = torch.arange(b, device=dy.device)
                x_sq = x[e, at].square().expand(b, heads, d_in)
                dy_sq = dy[:, e, at].square().sum(0).expand(b, heads, d_out)
                out = workspace.get("linear_diagonal", (b, heads, d_in, d_out), dy.dtype, dy.device)
                torch.mul(x_sq[..., None], dy_sq[:, :, None, :], out=out)
                yield name, out.view(b, -1)
                continue
            xt = x.permute(0, 2, 3, 1).expand(b, heads, -1, -1).reshape(b * heads, d_in, x.shape[1])

            def dy_of_class(c: int) -> Tensor:
                return dy[c].transpose(1, 2).expand(b, heads, -1, -1).reshape(b * heads, dy.shape[2], d_out)

            if diagonal:  # one class at a time through one buffer, its squares added as it comes
                grad = workspace.get("linear_grads", (b * heads, d_in, d_out), dy.dtype, dy.device)
                out = workspace.get("linear_diagonal", (b * heads, d_in, d_out), dy.dtype, dy.device)
                for c in range(k):
                    torch.bmm(xt, dy_of_class(c), out=grad)
                    torch.mul(grad, grad, out=out) if c == 0 else out.addcmul_(grad, grad)
                yield name, out.view(b, -1)
                continue
            out = workspace.get("linear_grads", (k, b * heads, d_in, d_out), dy.dtype, dy.device)
            for c in range(k):
                torch.bmm(xt, dy_of_class(c), out=out[c])
            yield name, out.view(k, b, -1).transpose(0, 1)

    return grads(), outputs
