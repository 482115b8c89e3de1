"""Attribution patching: every node's effect from one forward and a few backward passes of the base run.

AtP (Nanda 2023; Kramar et al. 2024) estimates the effect of patching node n as grad_n . (a_n' - a_n), the
change of its activation between the other run and the base run (``runs``) times the gradient of the linearised
outputs (``metrics``) at the base run. AtP* (Kramar et al., arXiv 2403.00745) fixes AtP's two false-negative modes:

- QK fix. A node's change reaches later attention heads' queries and keys, where a saturated softmax has almost
  no gradient. For the direct (residual-stream) path into each later head, the patched queries and keys are
  computed exactly, the attention pattern is recomputed with the exact softmax, and only the pattern's effect
  on the outputs is linearised; this replaces the first-order term of that path (the gradient at ``hook_q`` and
  ``hook_k``, which sit before any rotary embedding, times the change there). Queries and keys go through the
  rotary embedding the model applied (its own cos and sin: partial rotary and rope scaling included), and with
  grouped-query attention each query head reads its shared key/value head.
- GradDrop. Direct and indirect paths can cancel in the gradient while their effects do not cancel. The
  backward pass is repeated with the gradient through each later layer's residual writes (attention and MLP
  outputs) set to zero, and the node's estimate is the mean over the other layers of the absolute estimates
  (layers at or before the node's own give the plain estimate). AtP* therefore estimates magnitudes. Gradients
  are linear in what flows back, so a pass with a writer cut off is the full gradient minus the part through
  that writer, which takes a backward pass from the writer only (half of a full pass on average).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from ..adapters import ModelAdapter
from .metrics import MetricState, TraceMetric
from .nodes import NodeKind
from .runs import Runs, capture

QK_CHUNK = 2**24  # entries of the QK fix's [b, pos, units, heads, pos] tensors per chunk of units


def qk_fix_problems(cfg) -> list[str]:
    """What in a model's attention the QK fix (which recomputes causal dot-product attention, with rotate-half
    rotary embeddings and grouped-query attention) would get wrong; empty when it applies."""
    positions = cfg.positional_embedding_type
    return [name for name, bad in (
        (f"{positions} positions", positions not in ("standard", "rotary")),
        ("adjacent-pair (GPT-J-style) rotary embeddings", getattr(cfg, "rotary_adjacent_pairs", False)),
        ("QK normalisation", getattr(cfg, "use_qk_norm", False)),
        ("log-n attention scaling", getattr(cfg, "use_logn_attn", False)),
        ("attention soft-capping", (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0),
        ("attention sinks", getattr(cfg, "use_attention_sinks", False)),
        ("QKV clipping", getattr(cfg, "clip_qkv", None) is not None),
        ("split or per-head attention inputs", cfg.use_split_qkv_input or cfg.use_attn_in),
        ("bidirectional attention", cfg.attention_dir != "causal"),
    ) if bad]


def check_qk_fix(cfg) -> None:
    """Refuse models whose attention the QK fix would get wrong."""
    problems = qk_fix_problems(cfg)
    if problems:
        raise ValueError(f"AtP*'s QK fix supports causal dot-product attention (rotary and grouped-query included), "
                         f"not {', '.join(problems)}; use method='atp' (no QK fix) or method='patching'")


def attribution_effects(adapter: ModelAdapter, runs: Runs, kinds: list[NodeKind], metric: TraceMetric,
                        state: MetricState, *, qk_fix: bool, grad_drop: bool
                        ) -> dict[str, Float[Tensor, "b layers units pos"]]:
    """Per node kind, the AtP (or AtP*) estimate of each node's effect at each position up to each example's
    target (NaN at later positions). Everything runs inside the base run's context (a parameter perturbation must
    stay in place until the backward passes are done)."""
    with runs.context:
        return _estimates(adapter, runs, kinds, metric, state, qk_fix, grad_drop)


def _estimates(adapter, runs, kinds, metric, state, qk_fix, grad_drop):
    model = adapter.model
    n_layers = model.cfg.n_layers
    known = set(model.hook_dict)  # once: a bridge rebuilds its hook dict (with aliases) on every access
    acts: dict[str, Tensor] = {}

    def leaf(act, hook):  # the graph starts at the embeddings, whether or not parameters require gradients
        return act.detach().requires_grad_(True)

    node_hooks = [kind.hook(layer) for kind in kinds for layer in range(n_layers)]
    qk_names = [f"blocks.{layer}.attn.{name}" for layer in range(1, n_layers) for name in
                ("hook_q", "hook_k", "hook_pattern")] if qk_fix else []  # gradients taken there
    resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(1, n_layers)] if qk_fix else []
    rotary_names = [name for layer in range(1, n_layers) for name in
                    (f"blocks.{layer}.attn.hook_cos", f"blocks.{layer}.attn.hook_sin")
                    if qk_fix and name in known]  # a bridge's rotary embedding, as its attention got it
    writers = _writers(model.cfg.n_layers, known) if grad_drop else {}
    drop = [index for index in writers if index > 0]  # nothing upstream of the first writer is a node
    grad_names = list(dict.fromkeys(node_hooks + qk_names + [writers[w] for w in drop]))  # gradients taken there
    hooks = [("blocks.0.hook_resid_pre", leaf)] + [(name, capture(acts, name, detach=False))
                                                   for name in dict.fromkeys(grad_names + resid_names)]
    hooks += [(name, capture(acts, name)) for name in rotary_names]

    with torch.enable_grad(), adapter.hooks(hooks):
        logits = adapter.target_logits(runs.tokens, runs.targets[:, None])[:, 0]
        outputs = metric.outputs(logits, state)  # [b, m]
    deltas = {name: (runs.sources[name] - acts[name].detach()).double() for name in node_hooks}
    m = outputs.shape[1]
    slots = torch.eye(m, dtype=outputs.dtype, device=outputs.device)[:, None, :].expand(-1, outputs.shape[0], -1)
    full = _grads(outputs, slots, [acts[name] for name in grad_names])  # one backward per output slot, vectorised
    full = dict(zip(grad_names, full))
    linear = {kind.key: [] for kind in kinds}  # per pass: [m, layers, b, seq, units], gradient x change
    qk_grads = []  # per (pass, slot): hook name -> gradient at queries, keys and patterns (for the QK fix)
    P = 1 + len(drop)  # the full pass, then one per dropped writer
    for writer in [None, *drop]:
        by_name = full if writer is None else _dropped(full, acts, writers[writer], node_hooks + qk_names)
        for kind in kinds:
            linear[kind.key].append(torch.stack([_times_change(kind, by_name[kind.hook(layer)],
                                                               deltas[kind.hook(layer)])
                                                 for layer in range(n_layers)], 1))
        qk_grads += [{name: by_name[name][slot] for name in qk_names} for slot in range(m)]
    del outputs, logits, full, by_name

    b, seq = runs.tokens.shape
    after_target = torch.arange(seq)[None, :] > runs.targets.cpu()[:, None]  # [b, seq]
    later_heads = [_later_attention(model, later, acts, qk_grads, m) for later in range(1, n_layers)] if qk_fix else []
    for heads in later_heads:
        _check_recomputed_pattern(heads, acts[f"blocks.{heads.layer}.attn.hook_pattern"], after_target)
    out = {}
    for kind in kinds:
        changes = torch.cat(linear.pop(kind.key))  # [P*m, layers, b, seq, units]
        if later_heads:  # a one-layer model has no later heads
            changes = changes + _qk_corrections(model, kind, deltas, later_heads)
        changes = changes.reshape(P, m, n_layers, b, seq, -1).cpu()
        estimate = metric.estimate(changes.permute(0, 2, 4, 5, 3, 1), state)  # [P, layers, seq, units, b]
        per_pass = estimate.permute(0, 4, 1, 3, 2)  # [P, b, layers, units, seq]
        effects = _combine(per_pass, drop, kind, n_layers) if grad_drop else per_pass[0]
        out[kind.key] = effects.masked_fill(after_target[:, None, None, :], torch.nan)
    return out


def _grads(outputs: Tensor, slots: Tensor, inputs: list[Tensor]) -> list[Tensor]:
    """Gradients of ``outputs`` at ``inputs`` for each slot of ``slots`` (zeros where an input is not upstream)."""
    got = torch.autograd.grad(outputs, inputs, slots, retain_graph=True, allow_unused=True, is_grads_batched=True)
    return [torch.zeros(len(slots), *a.shape, dtype=a.dtype, device=a.device) if g is None else g
            for a, g in zip(inputs, got)]


def _dropped(full: dict[str, Tensor], acts: dict[str, Tensor], writer: str, names: list[str]) -> dict[str, Tensor]:
    """The gradients at ``names`` with no gradient through ``writer``'s residual write: the full gradients minus
    the part that flows through the writer (its own full gradient carried back from its output), so each pass
    only goes back from its writer, not from the outputs (gradients are linear in what flows in)."""
    through = torch.autograd.grad(acts[writer], [acts[name] for name in names], full[writer], retain_graph=True,
                                  allow_unused=True, is_grads_batched=True)
    return {name: full[name] if g is None else full[name] - g for name, g in zip(names, through)}


def _times_change(kind: NodeKind, grad: Tensor, delta: Tensor) -> Float[Tensor, "m b seq units"]:
    """Gradient . change per unit, for gradients with a leading slot axis [m, b, seq, ...]."""
    units = kind.as_units(grad.flatten(0, 1))
    units = units.reshape(grad.shape[0], -1, *units.shape[1:])  # [m, b, seq, units, features]
    return torch.einsum("mbtuf,btuf->mbtu", units.double(), kind.as_units(delta))


def _writers(n_layers: int, hooks: set[str]) -> dict[int, str]:
    """The residual writers GradDrop drops in turn, by writer index: attention and MLP outputs of each block
    (those among the model's ``hooks``)."""
    names = {}
    for layer in range(n_layers):
        for sublayer, name in enumerate(("hook_attn_out", "hook_mlp_out")):
            if f"blocks.{layer}.{name}" in hooks:
                names[2 * layer + sublayer] = f"blocks.{layer}.{name}"
    return names


def _combine(per_pass: Tensor, drop: list[int], kind: NodeKind, n_layers: int) -> Tensor:
    """GradDrop: per node, the mean over the residual writers other than its own of |estimate with that writer's
    gradient dropped|; a writer upstream of the node leaves its gradient as it is (the plain estimate)."""
    plain = per_pass[0].abs()
    out = torch.empty_like(plain)
    for layer in range(n_layers):
        own = kind.writer_index(layer)
        terms = [per_pass[1 + drop.index(w)][:, layer].abs() if w > own else plain[:, layer]
                 for w in [0, *drop] if not (kind.is_writer and w == own)]
        out[:, layer] = torch.stack(terms).mean(0) if terms else plain[:, layer]
    return out


Rotary = tuple[Float[Tensor, "_b pos rotary_dim"], Float[Tensor, "_b pos rotary_dim"]]  # cos, sin (batch 1 or b)


@dataclass(frozen=True)
class _LaterAttention:
    """One later block's attention as the QK fix needs it: recomputed in float64 from its residual input, with the
    gradients at its pattern, queries and keys of every (pass, slot). The same for every node kind."""

    layer: int
    W_Q: Tensor  # float64 weights and the logits' divisor, read once per block (a bridge builds them per read)
    b_Q: Tensor | float  # 0.0 where the model has no bias
    W_K: Tensor  # [kv_head, d_model, d_head]: per key/value head, as hook_k sees them
    b_K: Tensor | float
    scale: float
    rotary: Rotary | None
    group: int  # query heads per key/value head
    resid: Tensor  # [b, seq, d_model]
    q: Tensor  # [b, pos, head, d_head]: the queries at hook_q (before any rotary embedding)
    k: Tensor  # [b, pos, kv_head, d_head]: the keys at hook_k
    Q: Tensor  # [b, pos, head, d_head]: the queries and keys the logits take (rotated, keys per query head)
    K: Tensor
    A: Tensor  # [b, head, query, key]
    G: Tensor  # [c, b, head, query, key]: the c distinct (pass, slot) rows of gradients, see ``source``
    Gq: Tensor  # [c, b, pos, head, d_head]
    Gk: Tensor  # [c, b, pos, kv_head, d_head]
    GA: Tensor  # [c, b, head, query]: sum over keys of G . A
    source: Tensor  # [pm]: each (pass, slot)'s row among the c; a GradDrop pass whose writer lies after this
    # block leaves its gradients as in the full pass, and shares the full pass's rows


def _scale(model, attn) -> float:
    """The attention logits' divisor: a HookedTransformer's own, sqrt(d_head) for a TransformerBridge (checked
    against the model's pattern by ``_check_recomputed_pattern``)."""
    return float(attn.attn_scale) if hasattr(attn, "attn_scale") else model.cfg.d_head ** 0.5


def _key_weights(model, attn) -> tuple[Tensor, Tensor | None]:
    """W_K and b_K per key/value head, as hook_k sees them: a HookedTransformer's grouped-query attention shows W_K
    repeated per query head and keeps its own in _W_K (unless it ungroups them); a bridge's W_K is its own."""
    if hasattr(attn, "_W_K") and not getattr(model.cfg, "ungroup_grouped_query_attention", False):
        return attn._W_K, attn._b_K
    return attn.W_K, attn.b_K


def _rotary(model, attn, layer: int, acts: dict[str, Tensor], seq: int) -> Rotary | None:
    """The cos and sin of a block's rotary embedding as the model applied them (any rope scaling included): what a
    bridge's attention got (hook_cos, hook_sin); a HookedTransformer's tables at positions 0, 1, ... (a trace
    passes no attention mask). None without one (a rotary model whose cos and sin are not found this way is then
    refused by ``_check_recomputed_pattern``)."""
    if model.cfg.positional_embedding_type != "rotary":
        return None
    if hasattr(attn, "rotary_cos"):
        return attn.rotary_cos[None, :seq].double(), attn.rotary_sin[None, :seq].double()
    cos, sin = (acts.get(f"blocks.{layer}.attn.hook_{name}") for name in ("cos", "sin"))
    return None if cos is None else (cos.double(), sin.double())


def _rotate(x: Float[Tensor, "b pos *heads d_head"], rotary: Rotary | None) -> Float[Tensor, "b pos *heads d_head"]:
    """The rotary embedding at each position: the pairs (i, i + r/2) of the first r = rotary_dim features rotated,
    the rest passed through (Hugging Face's apply_rotary_pos_emb, TransformerLens's apply_rotary)."""
    if rotary is None:
        return x
    cos, sin = (c.reshape(*c.shape[:2], *[1] * (x.ndim - 3), c.shape[-1]) for c in rotary)
    r = cos.shape[-1]
    x_rot = x[..., :r]
    half = torch.cat((-x_rot[..., r // 2:], x_rot[..., : r // 2]), -1)
    return torch.cat((x_rot * cos + half * sin, x[..., r:]), -1)


def _for_scores(q: Tensor, k: Tensor, rotary: Rotary | None, group: int) -> tuple[Tensor, Tensor]:
    """Queries [..., head, d_head] and keys [..., kv_head, d_head] at hook_q and hook_k (or changes of them: the map is
    linear) as the logits take them: rotated, and keys repeated per query head (query head h reads key/value head
    h // group, as Hugging Face's repeat_kv and TransformerLens's repeat_interleave)."""
    return _rotate(q, rotary), _rotate(k, rotary).repeat_interleave(group, dim=-2)


def _check_recomputed_pattern(heads: _LaterAttention, pattern: Tensor, after_target: Tensor) -> None:
    """The QK fix is only as right as its recomputed attention: refuse a model whose pattern it does not reproduce
    (another scale, positional scheme or mask than causal dot-product attention with the model's rotary
    embedding), up to the rounding of the model's dtype."""
    rows = ~after_target.to(pattern.device)[:, None, :, None]  # query rows up to each example's target
    gap = float(((heads.A - pattern.detach().double()).abs() * rows).max())
    if gap > max(1e-4, 10 * torch.finfo(pattern.dtype).eps):
        raise ValueError(f"AtP*'s QK fix recomputes layer {heads.layer}'s attention pattern {gap:.1e} away from the "
                         "model's own (not causal dot-product attention with scale sqrt(d_head) and the model's "
                         "rotary embedding?); use method='atp' or method='patching'")


def _later_attention(model, later: int, acts: dict[str, Tensor], grads: list[dict[str, Tensor]], m: int
                     ) -> _LaterAttention:
    """Block ``later``'s attention recomputed, with the gradients of the (pass, slot) rows ``grads`` (``m`` slots
    per pass, the full pass first)."""
    attn = model.blocks[later].attn
    W_K, b_K = _key_weights(model, attn)
    W_Q, W_K = attn.W_Q.detach().double(), W_K.detach().double()
    b_Q, b_K = (0.0 if b is None else b.detach().double() for b in (attn.b_Q, b_K))
    scale = _scale(model, attn)
    resid = acts[f"blocks.{later}.hook_resid_pre"].detach().double()
    seq = resid.shape[1]
    rotary = _rotary(model, attn, later, acts, seq)
    group = W_Q.shape[0] // W_K.shape[0]
    with torch.no_grad():  # TL's norms return the model's dtype
        x = model.blocks[later].ln1(resid).double()
    q = torch.einsum("btd,hde->bthe", x, W_Q) + b_Q
    k = torch.einsum("btd,hde->bthe", x, W_K) + b_K
    Q, K = _for_scores(q, k, rotary, group)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=resid.device).tril()  # [query, key]
    A = (torch.einsum("bthe,bshe->bhts", Q, K) / scale).masked_fill(~causal, -torch.inf).softmax(-1)
    names = [f"blocks.{later}.attn.{name}" for name in ("hook_pattern", "hook_q", "hook_k")]
    as_full = [i >= m and all(torch.equal(grads[i][n], grads[i % m][n]) for n in names) for i in range(len(grads))]
    rows = [i for i, same in enumerate(as_full) if not same]
    position = {i: k for k, i in enumerate(rows)}
    source = torch.tensor([position[i % m] if same else position[i] for i, same in enumerate(as_full)])
    G, Gq, Gk = (torch.stack([grads[i][n] for i in rows]).double() for n in names)
    return _LaterAttention(later, W_Q, b_Q, W_K, b_K, scale, rotary, group, resid, q, k, Q, K, A, G, Gq, Gk,
                           (G * A).sum(-1), source.to(G.device))


def _layer_unit_chunks(n_layers: int, units: int, step: int) -> list[list[tuple[int, int, int]]]:
    """The (layer, unit) pairs of layers [0, n_layers) in chunks of at most ``step`` pairs, each chunk as
    (layer, first unit, end unit) runs: one pass of the QK fix per chunk instead of per layer (deep models have
    hundreds of earlier-later layer pairs of a few heads each)."""
    chunks, current, room = [], [], step
    for layer in range(n_layers):
        start = 0
        while start < units:
            stop = min(units, start + room)
            current.append((layer, start, stop))
            room -= stop - start
            start = stop
            if room == 0:
                chunks.append(current)
                current, room = [], step
    return chunks + ([current] if current else [])


def _qk_corrections(model, kind: NodeKind, deltas: dict[str, Tensor], later_heads: list[_LaterAttention]
                    ) -> Float[Tensor, "pm layers b seq units"]:
    """Per (pass, slot) and node: the exact-softmax effect of the node's direct-path change of every later
    head's queries and keys, minus the first-order term it replaces."""
    cfg = model.cfg
    first = deltas[kind.hook(0)]
    b, seq = first.shape[:2]
    units = kind.n_units(cfg)
    out = torch.zeros(len(later_heads[0].source), cfg.n_layers, b, seq, units, dtype=torch.float64,
                      device=first.device)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=first.device).tril()  # [query, key]
    step = max(1, QK_CHUNK // (b * seq * cfg.n_heads * seq))  # units per chunk
    delta_units = [kind.as_units(deltas[kind.hook(layer)]) for layer in range(cfg.n_layers)]
    for heads in later_heads:
        ln = model.blocks[heads.layer].ln1
        W_Q, b_Q, W_K, b_K, scale = heads.W_Q, heads.b_Q, heads.W_K, heads.b_K, heads.scale
        Q, K, A, G = heads.Q, heads.K, heads.A, heads.G
        G_key = G.permute(0, 1, 4, 2, 3)  # [pm, b, key, head, query]
        A_key = A.permute(0, 3, 1, 2)[:, :, None]  # [b, key, 1, head, query]
        logit_A = A_key.log() - torch.log1p(-A_key)
        # every earlier layer's nodes of this kind as one axis of (layer, unit) pairs, taken in chunks
        for chunk in _layer_unit_chunks(heads.layer, units, step):
            with torch.no_grad():
                writes = torch.cat([kind.writes(model, layer, delta_units[layer][:, :, start:stop], start)
                                    for layer, start, stop in chunk], dim=2)
                x2 = ln(heads.resid[:, :, None] + writes).double()
            # changes at hook_q and hook_k (what AtP's first-order terms multiply), and as the logits take them
            dq = torch.einsum("btud,hde->btuhe", x2, W_Q) + b_Q - heads.q[:, :, None]
            dk = torch.einsum("btud,hde->btuhe", x2, W_K) + b_K - heads.k[:, :, None]
            dQ, dK = _for_scores(dq, dk, heads.rotary, heads.group)
            # queries: row t of the pattern recomputed with the patched query at t
            rows = torch.einsum("btuhe,bshe->btuhs", Q[:, :, None] + dQ, K) / scale
            rows = rows.masked_fill(~causal[None, :, None, None, :], -torch.inf).softmax(-1)
            dA_rows = rows - A.permute(0, 2, 1, 3)[:, :, None]  # [b, query, unit, head, key]
            term = (torch.einsum("pbhts,btuhs->pbtu", G, dA_rows)
                    - torch.einsum("pbthe,btuhe->pbtu", heads.Gq, dq))
            # keys: entry t of every later row recomputed with the patched key at t (one logit moves)
            shift = torch.einsum("bshe,btuhe->btuhs", Q, dK) / scale  # [b, key, unit, head, query]
            new = torch.sigmoid(logit_A + shift)
            others = torch.where(A_key < 1, (1 - new) / (1 - A_key), torch.ones_like(new)) - 1
            # sum over rows s and heads of G . dA: the other entries of row s scale by (1 + others), entry t
            # becomes new
            term = (term + torch.einsum("btuhs,pbhs->pbtu", others, heads.GA)
                    + torch.einsum("btuhs,pbths->pbtu", new - A_key - others * A_key, G_key)
                    - torch.einsum("pbthe,btuhe->pbtu", heads.Gk, dk))[heads.source]
            offset = 0
            for layer, start, stop in chunk:
                out[:, layer, :, :, start:stop] += term[..., offset:offset + stop - start]
                offset += stop - start
    return out
