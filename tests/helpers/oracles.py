"""Slow, obviously-correct reference computations the fast paths are checked against."""

import torch


def loop_grads(model, tokens, seq_index, positions, space, fn):
    """Per example: a plain forward of its sequence alone, then one autograd.grad per output of ``fn``.

    ``fn(log_probs [vocab], example) -> [k]``. Returns [n_examples, k, space.size].
    """
    space.check_model(model)
    params, to_layout = _differentiable(model, space.names)
    rows = []
    for ex, (seq, pos) in enumerate(zip(seq_index.tolist(), positions.tolist())):
        logits = model(tokens[seq : seq + 1])[0, pos]
        outputs = fn(logits.log_softmax(-1), ex)
        grads = []
        for out in outputs:
            g = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
            grads.append(torch.cat([view(x if x is not None else torch.zeros_like(p)).reshape(-1)
                                    for x, p, view in zip(g, params, to_layout)]))
        rows.append(torch.stack(grads))
    return torch.stack(rows)


def _differentiable(model, names):
    """The tensors to differentiate for the named parameters and how each gradient becomes TL layout: the
    parameters themselves, or for a TransformerBridge the Hugging Face parameters and the adapter's views."""
    from npeff_tl.adapters import BridgeAdapter, as_adapter

    adapter = as_adapter(model)
    if isinstance(adapter, BridgeAdapter):
        mapped = [adapter.parameters_by_name[name] for name in names]
        return [m.parameter for m in mapped], [m.view for m in mapped]
    params = adapter.named_parameters()
    return [params[name] for name in names], [lambda g: g] * len(names)


def tl_grad(model, output, names):
    """d output / d the named parameters, each in TL layout, flattened and concatenated (one plain backward)."""
    params, to_layout = _differentiable(model, names)
    grads = torch.autograd.grad(output, params, retain_graph=True)
    return torch.cat([view(g).reshape(-1) for g, view in zip(grads, to_layout)])


def dense_fishers(model, tokens, seq_index, positions, space, class_ids, weights, candidates=None):
    """F_i = sum_c w_c g_c g_c^T, one backward per example per class: [n, size, size].

    With ``candidates``, log p_c is taken under the softmax over the candidate tokens only.
    """

    def class_log_probs(log_probs, ex):
        ids = class_ids[ex].clamp(min=0)
        if candidates is None:
            return log_probs[ids]
        restricted = log_probs[candidates].log_softmax(-1)  # renormalised over the candidates
        return torch.stack([restricted[candidates.index(int(c))] for c in ids])

    grads = loop_grads(model, tokens, seq_index, positions, space, class_log_probs)
    w = torch.where(class_ids >= 0, weights, 0.0).to(grads.dtype)
    return torch.einsum("nk,nkp,nkq->npq", w, grads, grads), grads
