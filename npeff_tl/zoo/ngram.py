"""Unigram and bigram models of a token stream: the baselines a field model's held-out loss is compared with,
and the bigram statistics the induction label uses (a copy that bigram statistics do not predict)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

DISCOUNT = 0.75  # absolute discounting, the usual Kneser-Ney value; nothing is tuned on held-out text


@dataclass(frozen=True)
class Bigram:
    """A bigram model with absolute discounting, backed off to an add-one unigram model:
    P(b | a) = max(c(a, b) - d, 0) / c(a) + d * N(a) / c(a) * P(b), with N(a) the number of distinct
    successors of a (P(b) alone where a was never seen)."""

    pair_keys: Int[Tensor, " pairs"]  # a * vocab + b of every pair seen, sorted
    pair_counts: Float[Tensor, " pairs"]
    first_counts: Float[Tensor, " vocab"]
    successors: Float[Tensor, " vocab"]
    unigram: Float[Tensor, " vocab"]

    @classmethod
    def fit(cls, stream: Int[Tensor, " n"], vocab_size: int) -> Bigram:
        stream = stream.long()
        unigram = (torch.bincount(stream, minlength=vocab_size).double() + 1) / (len(stream) + vocab_size)
        codes, counts = torch.unique(stream[:-1] * vocab_size + stream[1:], return_counts=True)
        first = torch.bincount(codes // vocab_size, weights=counts.double(), minlength=vocab_size)
        successors = torch.bincount(codes // vocab_size, minlength=vocab_size).double()
        return cls(codes, counts.double(), first, successors, unigram)

    def pair_count(self, a: Int[Tensor, " n"], b: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        query = a.long() * self.unigram.shape[0] + b.long()
        pos = torch.searchsorted(self.pair_keys, query).clamp(max=len(self.pair_keys) - 1)
        return torch.where(self.pair_keys[pos] == query, self.pair_counts[pos], torch.zeros((), dtype=torch.float64))

    def prob(self, a: Int[Tensor, " n"], b: Int[Tensor, " n"]) -> Float[Tensor, " n"]:
        """P(b | a) per pair."""
        a, b = a.long(), b.long()
        seen = self.first_counts[a]
        denom = seen.clamp(min=1)
        discounted = (self.pair_count(a, b) - DISCOUNT).clamp(min=0) / denom
        backoff = torch.where(seen > 0, DISCOUNT * self.successors[a] / denom, torch.ones((), dtype=torch.float64))
        return discounted + backoff * self.unigram[b]

    def loss(self, a: Int[Tensor, " n"], b: Int[Tensor, " n"]) -> float:
        """Mean negative log-probability (nats) of b after a."""
        return float(-self.prob(a, b).log().mean())

    def unigram_loss(self, b: Int[Tensor, " n"]) -> float:
        return float(-self.unigram[b.long()].log().mean())
