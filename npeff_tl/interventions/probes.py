"""Reading a model's predictions under interventions: target log-probabilities, KL of perturbed against
original predictions (``KLProbe`` keeps the originals), accuracy."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor, nn

from ..adapters import ModelAdapter, as_adapter
from ..examples import Examples, TokensLike
from ..pefs.grads import as_examples, batch_target_logits


def _log_probs_in_batches(
    model: nn.Module | ModelAdapter, examples: Examples | TokensLike, batch_size: int
) -> Iterator[Callable[[], Tensor]]:
    """Per batch of examples, a function that computes the float64 log-probabilities at their target positions
    (without gradients) under whatever interventions are active when it is called."""
    adapter = as_adapter(model)
    examples = as_examples(examples, adapter=adapter)
    for start in range(0, len(examples), batch_size):
        index = torch.arange(start, min(start + batch_size, len(examples)))

        def log_probs(index=index) -> Tensor:
            with torch.no_grad():
                return batch_target_logits(adapter, examples, index).double().log_softmax(-1).cpu()

        yield log_probs

def target_log_probs(model: nn.Module | ModelAdapter, examples: Examples | TokensLike,
                     batch_size: int = 64) -> Float64[Tensor, "n vocab"]:
    """Log-probabilities at the target positions (float64, CPU) under any interventions active around the call."""
    return torch.cat([log_probs() for log_probs in _log_probs_in_batches(model, examples, batch_size)])

def kl_rows(p: Float[Tensor, "n vocab"], q: Float[Tensor, "n vocab"]) -> Float[Tensor, " n"]:
    """KL(p || q) per row, from log-probabilities."""
    return (p.exp() * (p - q)).sum(-1).clamp(min=0)

def kl_divergence(
    model: nn.Module | ModelAdapter,
    examples: Examples | TokensLike,
    intervention=None,
    *,
    reverse: bool = False,
    batch_size: int = 64,
) -> Float[Tensor, " n"]:
    """KL between the predictive distributions at the target positions with and without ``intervention`` (a
    reusable context manager such as ``ParameterPerturbation``, entered once per batch; None for none):
    KL(perturbed || original) by default, KL(original || perturbed) with ``reverse``. Float64, per example."""
    out = []
    for log_probs in _log_probs_in_batches(model, examples, batch_size):
        original = log_probs()
        if intervention is None:
            changed = original
        else:
            with intervention:
                changed = log_probs()
        out.append(kl_rows(original, changed) if reverse else kl_rows(changed, original))
    return torch.cat(out)

class KLProbe:
    """A fixed set of examples with their original predictive distributions (computed once): per-example KL and
    correctness under any intervention, for all examples or a subset. ``answers`` default to the original top
    predictions (so "correct" then means "prediction unchanged")."""

    def __init__(self, model: nn.Module | ModelAdapter, examples: Examples | TokensLike,
                 answers: Int[Tensor, " n"] | None = None, *, reverse: bool = False, batch_size: int = 64):
        self.model, self.examples = as_adapter(model), as_examples(examples)
        self.reverse, self.batch_size = reverse, batch_size
        self.original = target_log_probs(self.model, self.examples, batch_size)
        self.answers = self.original.argmax(-1) if answers is None else torch.as_tensor(answers).cpu()
        self.correct = (self.original.argmax(-1) == self.answers).double()

    def __len__(self) -> int:
        return len(self.examples)

    def run(self, intervention, index: Int[Tensor, " k"] | None = None) -> tuple[Float64[Tensor, " k"], Float64[Tensor, " k"]]:
        """(KL per example, 1.0 where the answer is still the top prediction) under ``intervention``, entered once,
        for examples ``index`` (all when None)."""
        index = torch.arange(len(self.examples)) if index is None else torch.as_tensor(index)
        with intervention:
            changed = target_log_probs(self.model, self.examples.subset(index), self.batch_size)
        original = self.original[index]
        kl = kl_rows(original, changed) if self.reverse else kl_rows(changed, original)
        return kl, (changed.argmax(-1) == self.answers[index]).double()

def accuracy(model: nn.Module | ModelAdapter, examples: Examples | TokensLike, answers: Int[Tensor, " n"],
             batch_size: int = 64) -> Float[Tensor, " n"]:
    """1.0 where the top prediction at the target position is the answer, else 0.0 (under any interventions
    active around the call)."""
    predicted = target_log_probs(model, examples, batch_size).argmax(-1)
    return (predicted == torch.as_tensor(answers).cpu()).double()
