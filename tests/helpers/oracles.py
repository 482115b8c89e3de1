"""Slow, obviously-correct reference computations the fast paths are checked against."""

import torch


def loop_grads(model, tokens, seq_index, positions, space, fn):
    """Per example: a plain forward of its sequence alone, then one autograd.grad per output of ``fn``.

    ``fn(log_probs [vocab], example) -> [k]``. Returns [n_examples, k, space.size].
    """
    params = space.check_model(model)
    rows = []
    for ex, (seq, pos) in enumerate(zip(seq_index.tolist(), positions.tolist())):
        logits = model(tokens[seq : seq + 1])[0, pos]
        outputs = fn(logits.log_softmax(-1), ex)
        grads = []
        for out in outputs:
            g = torch.autograd.grad(out, list(params.values()), retain_graph=True, allow_unused=True)
            grads.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1) for x, p in zip(g, params.values())]))
        rows.append(torch.stack(grads))
    return torch.stack(rows)


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
