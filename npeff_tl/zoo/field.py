"""Field models: GPT-2-style HookedTransformers trained here on real text, the source of Python's standard library.

Unlike the task models, nothing about them is planted: they are small language models of code, trained on
the corpus's training files (``corpus.py``) with the shipped BPE tokenizer, and studied on next-token examples
from held-out files that training never saw (``field_data.py``). A field entry's card records the config, the
corpus (Python version, file-list hash, token counts), seeds, steps, time, and its held-out loss per token next
to a unigram and a bigram model of the same tokens.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from ..progress import progress_bar
from .corpus import Corpus
from .tokenizer import CODE_TOKENIZER_DIR, END_OF_TEXT, load_code_tokenizer


@dataclass(frozen=True)
class FieldEntry:
    """How a field model is built and trained: architecture, seeds, optimiser and schedule. Training draws
    ``steps`` batches of ``batch_size`` random windows of ``n_ctx + 1`` tokens from the training stream and
    minimises the next-token loss at every position, with ``threads`` torch threads (training repeats bit for
    bit on the same machine type with the same thread count)."""

    name: str
    n_layers: int = 4
    d_model: int = 256
    n_heads: int = 4
    d_mlp: int = 1024
    n_ctx: int = 128
    seed: int = 0
    steps: int = 1400
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    threads: int = 2
    # npeff-tl demo's settings for this entry (--set style): within 15 minutes on 2 cores (20 examples per stratum
    # took over 15 minutes at the default NPEFF settings; 16 per stratum leaves 192 held-out examples: top 20 + 150)
    demo: tuple[str, ...] = ("data.per_task=16", "selectivity.n_measured=3",
                             "selectivity.kl_targets=[0.5]", "selectivity.n_baseline=150")
    label_free_settings: tuple[str, ...] = ()  # NPEFF settings chosen for it without labels (docs/settings.md)

    def config(self, device: str | torch.device = "cpu") -> dict:
        """The model's HookedTransformerConfig settings."""
        return dict(n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                    d_head=self.d_model // self.n_heads, d_mlp=self.d_mlp, d_vocab=len(load_code_tokenizer()),
                    n_ctx=self.n_ctx, act_fn="gelu", normalization_type="LN", device=str(device), seed=self.seed,
                    model_name=self.name)

    def build_model(self, device: str | torch.device = "cpu"):
        """An untrained model of this entry with the code tokenizer attached."""
        from ..tl_models import build_model

        return build_model(self.config(device), tokenizer=load_code_tokenizer())

    def dataset(self, n_train: int, n_test: int):
        """The shipped field examples: the first ``n_train`` / ``n_test`` of each stratum (``field_data.py``)."""
        from .field_data import load_field_dataset

        return load_field_dataset(n_train, n_test)


def token_stream(tokenizer, texts: list[str], separator_id: int | None = None) -> Int[Tensor, " n"]:
    """The texts as one stream of token ids, each text preceded by the document separator ``separator_id`` (by
    default the tokenizer's end-of-text token, as GPT-2 separates documents)."""
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT) if separator_id is None else separator_id
    pieces = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts):
        pieces.append(torch.tensor([eot, *encoding.ids], dtype=torch.int32))
    return torch.cat(pieces)


def heldout_windows(stream: Int[Tensor, " n"], n_ctx: int) -> Int[Tensor, "w n_ctx_plus_1"]:
    """Non-overlapping windows of ``n_ctx + 1`` tokens (stride ``n_ctx``) covering the stream: the model predicts
    tokens 1..n_ctx of each window from the ones before them."""
    n = (len(stream) - 1) // n_ctx
    return torch.stack([stream[i * n_ctx: i * n_ctx + n_ctx + 1] for i in range(n)]).long()


def evaluate(model, windows: Int[Tensor, "w n_ctx_plus_1"], batch_size: int = 64) -> float:
    """Mean next-token loss (nats per token) over every predicted position of the windows."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start: start + batch_size]
            logits = model(batch[:, :-1])
            losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten(),
                                                       reduction="sum")
            total, count = total + float(losses), count + batch[:, 1:].numel()
    return total / count


def fit(entry: FieldEntry, train_stream: Int[Tensor, " n"], progress: bool = True):
    """The model of ``entry`` trained on ``train_stream`` (in eval mode), and the training figures for the card."""
    threads, was_deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(entry.threads)
    torch.use_deterministic_algorithms(True)  # with 2 threads, some CPU backward kernels add in a varying order
    try:
        return _fit(entry, train_stream, progress)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        torch.set_num_threads(threads)


def _fit(entry: FieldEntry, train_stream: Int[Tensor, " n"], progress: bool):
    model = entry.build_model()  # seeded by the config's seed
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=entry.lr, weight_decay=entry.weight_decay, betas=(0.9, 0.95))
    warmup = max(1, entry.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / entry.steps)))
    windows = torch.Generator().manual_seed(entry.seed)
    offsets = torch.arange(entry.n_ctx + 1)
    recent = []
    start = time.perf_counter()
    for _ in progress_bar(range(entry.steps), desc=f"train {entry.name}", enabled=progress):
        starts = torch.randint(0, len(train_stream) - entry.n_ctx - 1, (entry.batch_size,), generator=windows)
        batch = train_stream[starts[:, None] + offsets].long()
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), entry.clip_norm)
        opt.step()
        schedule.step()
        recent = (recent + [loss.item()])[-50:]
    tokens = entry.steps * entry.batch_size * entry.n_ctx
    figures = {"steps": entry.steps, "batch_size": entry.batch_size, "n_ctx": entry.n_ctx, "lr": entry.lr,
               "weight_decay": entry.weight_decay, "clip_norm": entry.clip_norm, "tokens_seen": tokens,
               "epochs": round(tokens / len(train_stream), 2), "final_train_loss": sum(recent) / len(recent),
               "seconds": round(time.perf_counter() - start, 1), "threads": entry.threads}
    return model.eval(), figures


def train_field(entry: FieldEntry, directory: Path, progress: bool = True) -> dict:
    """Train ``entry`` from scratch on the stdlib's training files with the shipped tokenizer; write
    ``model.safetensors`` (float16) and a card with the held-out figures to ``directory``. Returns the card."""
    from ..provenance import versions
    from ..store import save_json, save_tensors
    from .ngram import Bigram

    tokenizer = load_code_tokenizer()
    train_corpus, heldout_corpus = Corpus.from_stdlib("train"), Corpus.from_stdlib("heldout")
    train_stream = token_stream(tokenizer, train_corpus.texts())
    heldout_stream = token_stream(tokenizer, heldout_corpus.texts())
    model, training = fit(entry, train_stream, progress)
    state = {k: (v.to(torch.float16) if v.is_floating_point() else v).detach().contiguous()
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)  # evaluate the float16 weights that ship
    evaluation = heldout_windows(heldout_stream, entry.n_ctx)
    bigram = Bigram.fit(train_stream, len(tokenizer))
    previous, following = evaluation[:, :-1].flatten(), evaluation[:, 1:].flatten()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors(state, directory / "model.safetensors")
    card = {
        "name": entry.name,
        "config": {k: getattr(model.cfg, k) for k in (
            "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn", "normalization_type")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float16 (loaded as float32)",
        "tokenizer": {"kind": "byte-level BPE", "vocab_size": len(tokenizer), "directory": CODE_TOKENIZER_DIR.name,
                      "trained_on": "the corpus's training files"},
        "corpus": {"train": {**train_corpus.describe(), "tokens": len(train_stream)},
                   "heldout": {**heldout_corpus.describe(), "tokens": len(heldout_stream)}},
        "seeds": {"init": entry.seed, "windows": entry.seed},
        "training": training,
        "heldout_loss_per_token": {
            "model": evaluate(model, evaluation), "bigram": bigram.loss(previous, following),
            "unigram": bigram.unigram_loss(following), "tokens": len(following),
            "windows": f"{len(evaluation)} non-overlapping windows of {entry.n_ctx + 1} tokens"},
        "command": f"python -m npeff_tl.zoo.train {entry.name}",
        "versions": versions(),
    }
    save_json(card, directory / "card.json")
    return card


CHECK_PER_STRATUM = 8  # the card's check slice: the first 8 test examples of each stratum


def check_loss(model) -> float:
    """The model's mean loss (nats) on the card's check slice of the shipped field dataset: a figure any machine
    can reproduce offline, whatever its Python's standard library."""
    from .field_data import load_field_dataset, stratum_figures

    figures = stratum_figures(model, load_field_dataset(1, CHECK_PER_STRATUM)["test"])
    return sum(f["loss"] * f["examples"] for f in figures.values()) / sum(f["examples"] for f in figures.values())


def record_strata(directory: Path, model) -> dict:
    """Add to the card in ``directory`` the model's accuracy and mean loss per stratum of the field dataset (both
    splits, every example) and its loss on the check slice; returns the card."""
    from ..store import load_json, save_json
    from .field_data import PER_STRATUM, load_field_dataset, stratum_figures

    data = load_field_dataset(PER_STRATUM, PER_STRATUM)
    card = load_json(directory / "card.json")
    card["field_dataset"] = {split: stratum_figures(model, data[split]) for split in ("train", "test")}
    card["check"] = {"slice": f"the first {CHECK_PER_STRATUM} test examples of each stratum of the field dataset",
                     "loss": check_loss(model)}
    save_json(card, directory / "card.json")
    return card
