"""The zoo's offline tokenizers, shipped in the package: a word-level one for the task models (one token per word
of ``tasks.VOCAB``) and a byte-level BPE one for the field models, trained on the field corpus's training files."""

from __future__ import annotations

from pathlib import Path

from .tasks import VOCAB

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
CODE_TOKENIZER_DIR = Path(__file__).parent / "code_tokenizer"
END_OF_TEXT = "<|endoftext|>"  # the code tokenizer's one special token: begins every file, pads and ends text
CODE_VOCAB_SIZE = 4096


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


def build_code_tokenizer(texts: list[str], directory: Path = CODE_TOKENIZER_DIR, vocab_size: int = CODE_VOCAB_SIZE):
    """Train a byte-level BPE tokenizer (GPT-2's pre-tokenisation, no prefix space) on ``texts`` and save it to
    ``directory``; deterministic in the texts and their order. Returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
                                        pad_token=END_OF_TEXT, padding_side="right")
    tokenizer.save_pretrained(str(directory))
    return load_code_tokenizer(directory)


def load_code_tokenizer(directory: Path = CODE_TOKENIZER_DIR):
    """The shipped BPE tokenizer of the field models (read from the package, no network)."""
    from transformers import AutoTokenizer

    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(f"no code tokenizer in {directory}; reinstall npeff-tl or run "
                                "`python -m npeff_tl.zoo.train pycode-4l`")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.convert_tokens_to_ids(END_OF_TEXT) != 0:
        raise ValueError(f"the tokenizer in {directory} is not the field models' ({END_OF_TEXT} must be id 0)")
    return tokenizer
