"""Target: which predictive distribution a PEF is taken of, and which of its classes enter the expectation.

A language model predicts a distribution over the whole vocabulary at every position. A PEF needs one
distribution per example (the token position) and a tractable set of classes to take the Fisher's
expectation over (the class rule). Both are recorded in the metadata of every result.

Class rules give, per example, class ids and weights w_c; the PEF is sum_c w_c g_c g_c^T with
g_c = grad log p_c:
- ``TopK(k)``: the k most probable tokens, w_c = p_c (not renormalised, as in the reference).
- ``Threshold(tau, max_k)``: tokens with p_c >= tau, at most max_k (and at least min_k), w_c = p_c.
- ``Candidates(token_ids)``: a fixed token set with the softmax restricted to it, w_c = p_c restricted.
- ``Sampled(k, seed)``: k Monte-Carlo draws y ~ p (seeded per example), w_c = (times drawn) / k.
- ``TopKWithTail(k, tail_samples, seed)``: the k most probable tokens exactly (w_c = p_c) and the rest of the
  distribution by ``tail_samples`` draws from it (w_c = tail mass x (times drawn) / tail_samples): an unbiased
  estimate of the Fisher over the whole vocabulary, with low variance both for confident predictions (the tail
  is small) and for spread-out ones (the tail is sampled, not dropped).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor


@dataclass(frozen=True)
class ClassSelection:
    """The classes chosen for a batch of examples (ids of -1 and weight 0 pad to the rule's maximum)."""

    class_ids: Int[Tensor, "batch k"]
    weights: Float[Tensor, "batch k"]
    probs: Float[Tensor, "batch k"]


class ClassRule(ABC):
    """How to choose the classes of an example's predictive distribution."""

    @property
    @abstractmethod
    def max_classes(self) -> int:
        """The largest number of classes an example can get."""

    @abstractmethod
    def select(self, logits: Float[Tensor, "batch vocab"], example_ids: Int[Tensor, " batch"]) -> ClassSelection:
        """Class ids, weights and probabilities for a batch of examples (float64). ``example_ids`` are keys of
        the examples themselves (``Examples.identity``), which seeded rules draw from."""

    def log_probs(self, logits: Float[Tensor, "*batch vocab"]) -> Float[Tensor, "*batch vocab"]:
        """Log-probabilities of the distribution whose Fisher is taken (differentiable, vmap-safe)."""
        return logits.log_softmax(-1)

    def to_dict(self) -> dict[str, Any]:
        return {"rule": type(self).__name__, **asdict(self)}

    @staticmethod
    def from_dict(values: dict[str, Any]) -> ClassRule:
        """The rule ``to_dict`` wrote, e.g. ``{"rule": "TopK", "k": 4}`` (lists become tuples)."""
        rules = {cls.__name__: cls for cls in ClassRule.__subclasses__()}
        values = dict(values)
        name = values.pop("rule", None)
        if name not in rules:
            raise ValueError(f"class rule {name!r} is unknown; give rule = one of {', '.join(rules)}")
        try:
            return rules[name](**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        except TypeError as error:
            raise ValueError(f"class rule {name}: {error}") from None


def _full_probs(logits: Tensor) -> Tensor:
    return logits.double().softmax(-1)


@dataclass(frozen=True)
class TopK(ClassRule):
    k: int = 4

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"TopK needs k >= 1 classes, got k={self.k}")

    @property
    def max_classes(self) -> int:
        return self.k

    def select(self, logits, example_ids):
        _check_vocab(logits, self.k)
        probs, ids = _full_probs(logits).topk(self.k, dim=-1)
        return ClassSelection(ids, probs, probs)


@dataclass(frozen=True)
class Threshold(ClassRule):
    tau: float
    max_k: int = 8
    min_k: int = 1

    def __post_init__(self):
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"Threshold needs 0 < tau <= 1, got tau={self.tau}")
        if not 1 <= self.min_k <= self.max_k:
            raise ValueError(
                f"Threshold needs 1 <= min_k <= max_k, got min_k={self.min_k}, max_k={self.max_k} "
                "(min_k >= 1 keeps every example's class set non-empty)"
            )

    @property
    def max_classes(self) -> int:
        return self.max_k

    def select(self, logits, example_ids):
        _check_vocab(logits, self.max_k)
        probs, ids = _full_probs(logits).topk(self.max_k, dim=-1)
        keep = (probs >= self.tau) | (torch.arange(self.max_k, device=probs.device) < self.min_k)
        ids = torch.where(keep, ids, -1)
        probs = torch.where(keep, probs, 0.0)
        return ClassSelection(ids, probs, probs)


@dataclass(frozen=True)
class Candidates(ClassRule):
    token_ids: tuple[int, ...]

    def __init__(self, token_ids: Sequence[int]):
        ids = tuple(int(t) for t in token_ids)
        if not ids:
            raise ValueError("Candidates needs at least one token id; the class set would be empty")
        if len(set(ids)) != len(ids):
            raise ValueError(f"Candidates token ids must be distinct, got {list(ids)}")
        object.__setattr__(self, "token_ids", ids)

    @property
    def max_classes(self) -> int:
        return len(self.token_ids)

    def _mask(self, logits: Tensor) -> Tensor:
        vocab = logits.shape[-1]
        bad = [t for t in self.token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"candidate token ids {bad} are outside the vocabulary [0, {vocab})")
        mask = torch.full((vocab,), float("-inf"), dtype=logits.dtype, device=logits.device)
        mask[list(self.token_ids)] = 0.0
        return mask

    def log_probs(self, logits):
        return (logits + self._mask(logits)).log_softmax(-1)

    def select(self, logits, example_ids):
        ids = torch.tensor(self.token_ids, device=logits.device).expand(logits.shape[0], -1)
        probs = (logits.double() + self._mask(logits.double())).softmax(-1).gather(-1, ids)
        return ClassSelection(ids.clone(), probs, probs)


@dataclass(frozen=True)
class Sampled(ClassRule):
    k: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"Sampled needs k >= 1 draws, got k={self.k}")

    @property
    def max_classes(self) -> int:
        return self.k

    def select(self, logits, example_ids):
        probs = _full_probs(logits).cpu()
        batch = probs.shape[0]
        ids = torch.full((batch, self.k), -1, dtype=torch.long)
        weights = torch.zeros(batch, self.k, dtype=torch.float64)
        for row, example in enumerate(example_ids.tolist()):
            classes, shares = _draws(probs[row], self.k, self.seed, example)
            ids[row, : len(classes)] = classes
            weights[row, : len(classes)] = shares
        chosen_probs = torch.where(ids >= 0, probs.gather(-1, ids.clamp(min=0)), 0.0)
        device = logits.device
        return ClassSelection(ids.to(device), weights.to(device), chosen_probs.to(device))


@dataclass(frozen=True)
class TopKWithTail(ClassRule):
    k: int = 4
    tail_samples: int = 12
    seed: int = 0

    def __post_init__(self):
        if self.k < 1 or self.tail_samples < 1:
            raise ValueError(f"TopKWithTail needs k >= 1 and tail_samples >= 1, got k={self.k}, "
                             f"tail_samples={self.tail_samples}")

    @property
    def max_classes(self) -> int:
        return self.k + self.tail_samples

    def select(self, logits, example_ids):
        _check_vocab(logits, self.k)
        probs = _full_probs(logits).cpu()
        top_probs, top_ids = probs.topk(self.k, dim=-1)
        tail = probs.scatter(1, top_ids, 0.0)
        mass = tail.sum(1)
        ids = torch.full((len(probs), self.tail_samples), -1, dtype=torch.long)
        weights = torch.zeros(len(probs), self.tail_samples, dtype=torch.float64)
        for row, example in enumerate(example_ids.tolist()):
            if mass[row] > 0:
                classes, shares = _draws(tail[row] / mass[row], self.tail_samples, self.seed, example)
                ids[row, : len(classes)] = classes
                weights[row, : len(classes)] = mass[row] * shares
        tail_probs = torch.where(ids >= 0, probs.gather(-1, ids.clamp(min=0)), 0.0)
        device = logits.device
        return ClassSelection(torch.cat([top_ids, ids], 1).to(device), torch.cat([top_probs, weights], 1).to(device),
                              torch.cat([top_probs, tail_probs], 1).to(device))


def _draws(probs: Float[Tensor, " vocab"], n: int, seed: int, example: int) -> tuple[Tensor, Tensor]:
    """``n`` draws from ``probs`` with replacement: the distinct classes, most drawn first, and the share of draws
    each got. One generator per example, so the draws do not depend on batching, sharding or device."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + example) % 2**63)
    classes, counts = torch.multinomial(probs, n, replacement=True, generator=generator).unique(return_counts=True)
    order = counts.argsort(descending=True, stable=True)
    return classes[order], counts[order].double() / n


def _check_vocab(logits: Tensor, k: int) -> None:
    if k > logits.shape[-1]:
        raise ValueError(f"the rule asks for {k} classes but the vocabulary has only {logits.shape[-1]}")


Position = int | str | Sequence[int] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class Target:
    """Which position's predictive distribution, and which classes of it, a PEF is taken over.

    ``position`` applies to raw token sequences: ``"last"`` (the last non-padding token), an int (a
    non-negative index, or negative counted back from the last non-padding token: -1 is "last"), one position
    per sequence, or a list of positions per sequence (each (sequence, position) pair is then a separate example
    sharing one forward pass). Position t means the model's prediction made at token t (of token t + 1).
    ``None`` (the default): the positions ``nt.Examples`` carry, or ``"last"`` for raw token sequences. Given
    with ``nt.Examples``, it must name the positions they hold (else a ``ValueError``), so the two cannot
    silently disagree.
    """

    position: Position | None = None
    classes: ClassRule = TopK(4)

    def __post_init__(self):
        if isinstance(self.position, str) and self.position != "last":
            raise ValueError(f"position must be 'last', an int, or per-sequence positions; got {self.position!r}")
        if not isinstance(self.classes, ClassRule):
            raise TypeError(
                f"classes must be a class rule (TopK, Threshold, Candidates or Sampled), got {self.classes!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        position = self.position if isinstance(self.position, (int, str)) else "per_example"  # None too
        return {"position": position, "classes": self.classes.to_dict()}
