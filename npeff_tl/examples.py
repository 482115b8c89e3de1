"""Examples: token sequences plus one target position per example.

An example is a (sequence, position) pair. Usually each sequence gives one example; several positions of one
sequence give several examples that share a forward pass. Sequences are right-padded (TransformerLens's
default padding side), so padding never changes the prediction at a real token of a causal model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from .targets import Position

TokensLike = Tensor | Sequence[Sequence[int]] | Sequence[Tensor]


@dataclass(frozen=True)
class Examples:
    """Right-padded token sequences and, per example, its sequence and target position (sequence-major)."""

    tokens: Int[Tensor, "n_seq seq"]
    lengths: Int[Tensor, " n_seq"]
    seq_index: Int[Tensor, " n_examples"]
    position: Int[Tensor, " n_examples"]

    def __len__(self) -> int:
        return int(self.seq_index.shape[0])

    def __repr__(self) -> str:
        return (f"Examples({len(self)} examples in {self.tokens.shape[0]} sequences of up to {self.tokens.shape[1]} "
                f"tokens)")

    @classmethod
    def from_tokens(
        cls,
        tokens: TokensLike,
        position: Position = "last",
        *,
        attention_mask: Tensor | None = None,
        pad_token_id: int | None = None,
    ) -> Examples:
        """Build examples from a [n, seq] tensor or a list of (ragged) token lists.

        Sequence lengths come from ``attention_mask`` (1 = real token), else from trailing ``pad_token_id``
        runs, else from the ragged list lengths, else every token counts.
        """
        tokens, lengths = _pad(tokens)
        if attention_mask is not None:
            lengths = _lengths_from_mask(torch.as_tensor(attention_mask), tokens.shape)
        elif pad_token_id is not None:
            real = tokens != pad_token_id
            last_real = torch.where(real, torch.arange(tokens.shape[1]), -1).max(dim=1).values
            lengths = last_real + 1
        if int(lengths.min()) < 1:
            empty = torch.nonzero(lengths < 1).flatten().tolist()[:10]
            raise ValueError(f"sequences {empty} have no real tokens; every example needs at least one token")
        seq_index, positions = resolve_positions(position, lengths)
        return cls(tokens, lengths, seq_index, positions)

    def subset(self, index: Int[Tensor, " k"] | Sequence[int]) -> Examples:
        """Examples ``index`` (in that order), sharing the token tensor."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Examples(self.tokens, self.lengths, self.seq_index[index], self.position[index])

    def identity(self, index: Int[Tensor, " k"] | Sequence[int]) -> Int[Tensor, " k"]:
        """A 63-bit key per example from its own tokens and target position, not its place in this collection:
        seeded rules (``Sampled``) draw the same classes for an example however the examples are subset,
        ordered or batched."""
        keys = []
        for i in torch.as_tensor(index, dtype=torch.long).tolist():
            seq, position = int(self.seq_index[i]), int(self.position[i])
            digest = hashlib.blake2b(digest_size=8)
            digest.update(self.tokens[seq, : int(self.lengths[seq])].to(torch.int64).cpu().numpy().tobytes())
            digest.update(position.to_bytes(8, "little", signed=True))
            keys.append(int.from_bytes(digest.digest(), "little") >> 1)
        return torch.tensor(keys, dtype=torch.long)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raise a ``ValueError`` naming the first real token id outside 0..vocab_size-1 (an embedding lookup would
        fail far from the cause, or silently read another row on some devices)."""
        real = torch.arange(self.tokens.shape[1]) < self.lengths[:, None]
        bad = real & ((self.tokens < 0) | (self.tokens >= vocab_size))
        if bad.any():
            seq, pos = (int(i) for i in torch.nonzero(bad)[0])
            raise ValueError(f"token id {int(self.tokens[seq, pos])} (sequence {seq}, position {pos}; "
                             f"{int(bad.sum())} such ids in all) is outside the model's vocabulary of {vocab_size}; "
                             "tokenize with the model's own tokenizer")

    def fingerprint(self) -> str:
        """A hash of the tokens and target positions, to tell runs on different data apart."""
        digest = hashlib.sha256()
        for tensor in (self.tokens, self.lengths, self.seq_index, self.position):
            digest.update(tensor.to(torch.int64).cpu().numpy().tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class LabeledExamples:
    """Examples with what is known about them, each part optional: the answer token per example (for accuracy and
    loss gradients), a ground-truth strategy label per example (``labels``), and the strategies each example
    needs (``factors``; multi-factor examples list two or more)."""

    examples: Examples
    answers: Int[Tensor, " n_examples"] | None = None
    labels: Sequence[str] | None = None  # stored as a tuple
    factors: Sequence[Sequence[str]] | None = None  # stored as a tuple of tuples

    def __repr__(self) -> str:
        known = [name for name in ("answers", "labels", "factors") if getattr(self, name) is not None]
        groups = f", {len(set(self.labels))} labels" if self.labels is not None else ""
        return f"LabeledExamples({len(self)} examples{groups}; with {', '.join(known) or 'nothing else'})"

    def __post_init__(self):
        n = len(self.examples)
        if self.answers is not None:
            object.__setattr__(self, "answers", torch.as_tensor(self.answers, dtype=torch.long).reshape(-1))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(s) for s in self.labels))
        if self.factors is not None:
            object.__setattr__(self, "factors", tuple(tuple(str(s) for s in f) for f in self.factors))
        for name in ("answers", "labels", "factors"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"got {len(value)} {name} for {n} examples; give one per example")

    def __len__(self) -> int:
        return len(self.examples)

    @classmethod
    def from_dataset(cls, rows, tokens: str = "tokens", position: str = "target_pos", answer: str | None = "answer",
                     label: str | None = "strategy", factors: str | None = "strategies") -> LabeledExamples:
        """From a ``datasets`` split (or a dict of columns) with one target position per row, such as a zoo split.
        Optional columns that are named None or absent are left out."""
        columns = rows.column_names if hasattr(rows, "column_names") else list(rows)
        for name in (tokens, position):
            if name not in columns:
                raise ValueError(f"no column {name!r}; the columns are {columns}")

        def column(name):
            return rows[name] if name is not None and name in columns else None

        examples = Examples.from_tokens(rows[tokens], list(rows[position]))
        answers = column(answer)
        return cls(examples, None if answers is None else torch.as_tensor(answers), column(label), column(factors))

    def subset(self, index: Int[Tensor, " k"] | Sequence[int]) -> LabeledExamples:
        index = torch.as_tensor(index, dtype=torch.long)
        rows = index.tolist()

        def pick(values):
            return None if values is None else tuple(values[i] for i in rows)

        return LabeledExamples(self.examples.subset(index), None if self.answers is None else self.answers[index],
                               pick(self.labels), pick(self.factors))


def _pad(tokens: TokensLike) -> tuple[Tensor, Tensor]:
    if isinstance(tokens, Tensor):
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise ValueError(f"tokens must be an integer tensor [n_sequences, seq_len], got shape {tuple(tokens.shape)}")
        return tokens.long(), torch.full((tokens.shape[0],), tokens.shape[1], dtype=torch.long)
    rows = [torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in tokens]
    if not rows:
        raise ValueError("no examples: the token list is empty")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    padded = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
    for i, row in enumerate(rows):
        padded[i, : len(row)] = row
    return padded, lengths


def _lengths_from_mask(mask: Tensor, shape: torch.Size) -> Tensor:
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but tokens have shape {tuple(shape)}")
    mask = mask.bool().cpu()
    lengths = mask.sum(dim=1)
    right_padded = torch.arange(shape[1]) < lengths[:, None]
    if not torch.equal(mask, right_padded):
        raise ValueError(
            "attention_mask is not right-padded (real tokens first, then padding); left padding shifts "
            "positions: re-tokenize with padding_side='right'"
        )
    return lengths


def resolve_positions(position: Position, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """(sequence of each example, its target position) for a ``Target``-style ``position`` over sequences of
    ``lengths`` real tokens; negative positions count back from the last real token (-1 is the last)."""
    n_seq = lengths.shape[0]
    if isinstance(position, str):  # "last"; Target validates the string
        per_seq: list[list[int]] = [[-1] for _ in range(n_seq)]
    elif isinstance(position, int):
        per_seq = [[position] for _ in range(n_seq)]
    else:
        position = position.tolist() if isinstance(position, Tensor) else list(position)
        if len(position) != n_seq:
            raise ValueError(f"got {len(position)} target positions for {n_seq} sequences; give one entry per sequence")
        per_seq = [[int(p)] if isinstance(p, int) else [int(q) for q in p] for p in position]
    seq_index, positions = [], []
    for seq, (plist, length) in enumerate(zip(per_seq, lengths.tolist())):
        for given in plist:
            p = given if given >= 0 else length + given
            if not 0 <= p < length:
                raise ValueError(
                    f"target position {given} is out of range for sequence {seq}, which has {length} real tokens "
                    f"(valid positions: 0..{length - 1}, or -1..-{length} counted back from the last)"
                )
            seq_index.append(seq)
            positions.append(p)
    if not seq_index:
        raise ValueError("no examples: every sequence was given an empty list of target positions")
    return torch.tensor(seq_index, dtype=torch.long), torch.tensor(positions, dtype=torch.long)
