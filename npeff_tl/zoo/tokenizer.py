"""The zoo's offline word-level tokenizer (one token per word of ``tasks.VOCAB``), shipped in the package."""

from __future__ import annotations

from pathlib import Path

from .tasks import VOCAB

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"


def build_tokenizer(directory: Path = TOKENIZER_DIR):
    """Build the tokenizer from ``VOCAB`` and save it to ``directory`` (what ``python -m npeff_tl.zoo.train``
    does before training); returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<unk>",
        padding_side="right", add_bos_token=False,
    )
    tokenizer.save_pretrained(str(directory))
    return load_tokenizer(directory)


def load_tokenizer(directory: Path = TOKENIZER_DIR):
    """The shipped tokenizer (no network: it is read from the package)."""
    from transformers import AutoTokenizer

    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no zoo tokenizer in {directory}; reinstall npeff-tl or run `python -m npeff_tl.zoo.train --tokenizer`"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.convert_ids_to_tokens(list(range(len(VOCAB)))) != VOCAB:
        raise ValueError(f"the tokenizer in {directory} does not match npeff_tl.zoo.tasks.VOCAB; rebuild it")
    return tokenizer
