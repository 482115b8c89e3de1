"""Synthetic tasks whose per-example strategy is known: the ground truth of the zoo.

Every example is a prompt (words) whose next word is the answer. Number tasks announce their strategy with
a marker word (``MAX 3 9 1 5 7 =`` -> ``9``); letter tasks do not: a model must infer from the content
whether the last letter occurred before (induction: answer the letter that followed it) or not (bigram:
answer a fixed table's successor of the last letter). Those two share their surface (the same multiset
statistics of letters: one repeated letter, the rest distinct); only the order of the letters tells them
apart. ``succ_max`` needs two strategies at once (the successor of the maximum).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

N_NUMBERS = 16
NUMBERS = [str(i) for i in range(N_NUMBERS)]
LETTERS = list("abcdefghijklmnop")
MARKERS = ["FIRST", "MAX", "MIN", "SUCC"]
SPECIAL = ["<pad>", "<unk>", "<bos>", "="]
VOCAB = SPECIAL + MARKERS + NUMBERS + LETTERS
N_ITEMS = 5  # numbers per number prompt
N_LETTERS = 10  # letters per letter prompt


def bigram_table(seed: int) -> dict[str, str]:
    """The fixed letter -> letter map of the bigram task: a derangement drawn from ``seed``."""
    rng = random.Random(f"bigram-{seed}")
    while True:
        image = LETTERS[:]
        rng.shuffle(image)
        if all(a != b for a, b in zip(LETTERS, image)):
            return dict(zip(LETTERS, image))


@dataclass(frozen=True)
class Task:
    """One example type: its name, the single strategies its answers need, and its generator."""

    name: str
    strategies: tuple[str, ...]

    def sample(self, rng: random.Random, table: dict[str, str]) -> tuple[list[str], str]:
        """(prompt words without <bos>, answer word)."""
        if self.name in ("first", "max", "min", "succ", "succ_max"):
            xs = [rng.randrange(N_NUMBERS) for _ in range(N_ITEMS)]
            answer = {
                "first": xs[0], "max": max(xs), "min": min(xs), "succ": (xs[-1] + 1) % N_NUMBERS,
                "succ_max": (max(xs) + 1) % N_NUMBERS,
            }[self.name]
            markers = ["SUCC", "MAX"] if self.name == "succ_max" else [self.name.upper()]
            return markers + [str(x) for x in xs] + ["="], str(answer)
        if self.name == "induction":  # 9 distinct letters, then a repeat of one of the first 8
            letters = rng.sample(LETTERS, N_LETTERS - 1)
            j = rng.randrange(N_LETTERS - 2)
            return letters + [letters[j]], letters[j + 1]
        if self.name == "bigram":  # 8 distinct letters, one of them twice, then a letter not seen yet
            letters = rng.sample(LETTERS, N_LETTERS - 1)
            last = letters.pop()
            letters.insert(rng.randrange(len(letters) + 1), rng.choice(letters))
            return letters + [last], table[last]
        raise ValueError(f"unknown task {self.name!r}")


TASKS = {
    t.name: t
    for t in [
        Task("first", ("first",)),
        Task("max", ("max",)),
        Task("min", ("min",)),
        Task("succ", ("succ",)),
        Task("induction", ("induction",)),
        Task("bigram", ("bigram",)),
        Task("succ_max", ("max", "succ")),
    ]
}


def generate(task_names: list[str], n_per_task: int, seed: int | str, table_seed: int) -> list[dict]:
    """``n_per_task`` examples of each task, interleaved, deterministic in ``seed`` (rows as dicts of words)."""
    unknown = [name for name in task_names if name not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; available: {sorted(TASKS)}")
    rng = random.Random(f"examples-{seed}")
    table = bigram_table(table_seed)
    rows = []
    for _ in range(n_per_task):
        for name in task_names:
            words, answer = TASKS[name].sample(rng, table)
            rows.append({"words": ["<bos>"] + words, "answer": answer, "strategy": name,
                         "strategies": list(TASKS[name].strategies)})
    return rows
