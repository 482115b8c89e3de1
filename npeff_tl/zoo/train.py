"""Train a zoo entry from scratch, deterministically: ``python -m npeff_tl.zoo.train NAME [--out DIR]``.

Task models: one thread, seeded initialisation and a seeded stream of fresh training examples (never the test
split); the loss is the cross-entropy of the answer at each prompt's last position. Field models: a language
model on the stdlib's training files (``field.py``). Either way it writes ``model.safetensors`` and
``card.json`` (config, data, seeds, settings, held-out figures, the command) into the entry's package
directory or ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from ..examples import Examples
from ..interventions import accuracy as example_accuracy
from ..progress import progress_bar
from ..provenance import versions
from ..store import save_json, save_tensors
from . import MODELS_DIR, FieldEntry, build_model, dataset, entry, load_model
from .corpus import Corpus
from .field import record_strata, train_field
from .field_data import FIELD_RECIPES, build_field_data, build_recipe
from .tasks import VOCAB, generate
from .tokenizer import TOKENIZER_DIR, build_code_tokenizer, build_tokenizer


def batch_tensors(token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded tokens and the last position of each prompt."""
    lengths = torch.tensor([len(t) for t in token_lists])
    tokens = torch.zeros(len(token_lists), int(lengths.max()), dtype=torch.long)
    for i, t in enumerate(token_lists):
        tokens[i, : len(t)] = torch.tensor(t)
    return tokens, lengths - 1


def accuracy(model, split, batch_size: int = 512) -> dict[str, float]:
    """Share of examples of each strategy whose top prediction at ``target_pos`` is the answer."""
    examples = Examples.from_tokens(split["tokens"], split["target_pos"])
    hits = example_accuracy(model, examples, torch.tensor(split["answer"]), batch_size=batch_size)
    strategies = split["strategy"]
    return {s: float(hits[[i for i, t in enumerate(strategies) if t == s]].mean()) for s in sorted(set(strategies))}


def train(name: str, out: Path | None = None, progress: bool = True, steps: int | None = None) -> dict:
    """Train entry ``name`` (``steps`` overrides its step count, for quick checks) and write it out."""
    e = entry(name)
    if steps is not None:
        e = dataclasses.replace(e, steps=steps)
    directory = Path(out) if out is not None else MODELS_DIR / name
    if isinstance(e, FieldEntry):
        train_field(e, directory, progress)
        return record_strata(directory, load_model(name, directory=directory))
    torch.set_num_threads(1)  # bitwise-repeatable CPU training
    if not (TOKENIZER_DIR / "tokenizer.json").exists():
        build_tokenizer()
    model = build_model(name)  # seeded by the config's seed
    model.train()
    ids = {word: i for i, word in enumerate(VOCAB)}
    opt = torch.optim.AdamW(model.parameters(), lr=e.lr, weight_decay=e.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, e.steps // 20)

    def lr_at(step):
        return min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / e.steps))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    per_step = math.ceil(e.batch_size / len(e.tasks))
    start = time.perf_counter()
    for step in progress_bar(range(e.steps), desc=f"train {name}", enabled=progress):
        rows = generate(list(e.tasks), per_step, seed=f"train-{e.seed}-{step}", table_seed=e.table_seed)
        tokens, pos = batch_tensors([[ids[w] for w in r["words"]] for r in rows])
        answers = torch.tensor([ids[r["answer"]] for r in rows])
        logits = model(tokens)[torch.arange(len(pos)), pos]
        loss = torch.nn.functional.cross_entropy(logits, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    acc = accuracy(model, dataset(name)["test"])
    directory.mkdir(parents=True, exist_ok=True)
    save_tensors({k: v.detach().contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    card = {
        "name": name,
        "config": {k: getattr(model.cfg, k) for k in (
            "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx", "act_fn", "normalization_type")},
        "tasks": list(e.tasks),
        "mixture": {t: 1 / len(e.tasks) for t in e.tasks},
        "seeds": {"init": e.seed, "data": e.data_seed, "bigram_table": e.table_seed},
        "training": {"steps": e.steps, "batch_size": per_step * len(e.tasks), "lr": e.lr,
                     "weight_decay": e.weight_decay, "final_loss": loss.item(), "seconds": round(seconds, 1),
                     "threads": 1},
        "test_accuracy": acc,
        "command": f"python -m npeff_tl.zoo.train {name}",
        "versions": versions(),
    }
    save_json(card, directory / "card.json")
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m npeff_tl.zoo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", help="zoo entry to train")
    parser.add_argument("--out", type=Path, help="write here instead of the package directory")
    parser.add_argument("--tokenizer", action="store_true", help="only rebuild the shipped word-level tokenizer")
    parser.add_argument("--code-tokenizer", action="store_true",
                        help="only rebuild the field models' BPE tokenizer from this Python's stdlib")
    parser.add_argument("--field-data", nargs="?", const="pycode-4l", metavar="NAME",
                        help="only rebuild a field dataset from this Python's stdlib: pycode-4l's (the default, with "
                             f"the shipped tokenizer) or a pretrained entry's ({', '.join(FIELD_RECIPES)}; with the "
                             "prepared entry's tokenizer unless --tokenizer-dir names one)")
    parser.add_argument("--tokenizer-dir", type=Path, metavar="DIR",
                        help="with --field-data NAME: a directory holding the entry's Hugging Face tokenizer (default: "
                             "the prepared entry's, prepared first if needed)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.tokenizer:
        build_tokenizer()
        return 0
    if args.code_tokenizer:
        build_code_tokenizer(Corpus.from_stdlib("train").texts())
        return 0
    if args.field_data == "pycode-4l":
        build_field_data(progress=not args.quiet)
        return 0
    if args.field_data is not None:
        if args.field_data not in FIELD_RECIPES:
            parser.error(f"no field dataset {args.field_data!r}; known: pycode-4l, {', '.join(FIELD_RECIPES)}")
        from transformers import AutoTokenizer

        start = time.perf_counter()
        tokenizer = (entry(args.field_data).tokenizer(progress=not args.quiet) if args.tokenizer_dir is None
                     else AutoTokenizer.from_pretrained(str(args.tokenizer_dir)))  # the prepared entry's by default
        meta = build_recipe(args.field_data, tokenizer, directory=args.out, progress=not args.quiet)
        print({"field_data": args.field_data, "strata": meta["strata"], "dropped": meta["dropped"],
               "seconds": round(time.perf_counter() - start, 1)})
        return 0
    if args.name is None:
        parser.error("give a zoo entry name")
    try:
        card = train(args.name, args.out, progress=not args.quiet)
    except ValueError as error:
        print(f"npeff_tl.zoo.train: error: {error}", file=sys.stderr)
        return 2
    print({k: card[k] for k in ("name", "test_accuracy", "heldout_loss_per_token", "training") if k in card})
    return 0


if __name__ == "__main__":
    sys.exit(main())
