"""How good a language model of the field text each model is: held-out loss of the real pretrained model
(SmolLM2-135M) next to the field model pycode-4l and bigram / unigram models, on the same text.

Run:  .venv/bin/python -u benchmarks/heldout_loss.py [--files N] [--models pycode-4l smollm2-135m]

Text: the held-out files of the standard library (never seen by pycode-4l in training; SmolLM2 was pretrained on
web code and may well have seen them, so its figure is an upper bound on how well it generalises). Each file is
tokenised whole by each model's own tokenizer, preceded by its document token, and cut into non-overlapping
windows of 128 tokens (each token predicted from the ones before it in its window). Tokenizers differ, so the
comparable figure is nats per byte of text (the sum of the token losses over the bytes they cover); nats per token
is given too. Bigram and unigram: pycode-4l's (the code tokenizer's statistics of the training files, absolute
discounting). ``--files N`` takes the first N held-out files (default: all).

Last line: heldout_loss: smollm2_nats_per_byte=<a> pycode_nats_per_byte=<b> bigram_nats_per_byte=<c>
smollm2_nats_per_token=<d> pycode_nats_per_token=<e>
"""

from __future__ import annotations

import argparse

import torch

import npeff_tl as nt
from npeff_tl.zoo.corpus import Corpus
from npeff_tl.zoo.field import heldout_windows, token_stream
from npeff_tl.zoo.ngram import Bigram
from npeff_tl.zoo.tokenizer import END_OF_TEXT, load_code_tokenizer

N_CTX, BATCH = 128, 16


def document_token(tokenizer) -> int:
    """The token that separates documents: the code tokenizer's end-of-text, SmolLM2's <|endoftext|>."""
    return tokenizer.convert_tokens_to_ids(END_OF_TEXT)


def model_loss(model, tokenizer, texts: list[str]) -> tuple[float, int]:
    """(total nats, predicted tokens) of ``model`` over the texts, windows of N_CTX tokens per file."""
    total, count = 0.0, 0
    windows = []
    for text in texts:
        ids = torch.tensor([document_token(tokenizer), *tokenizer(text, add_special_tokens=False)["input_ids"]])
        n = (len(ids) - 1 + N_CTX - 1) // N_CTX
        windows += [ids[i * N_CTX: i * N_CTX + N_CTX + 1] for i in range(n)]
    full = [w for w in windows if len(w) == N_CTX + 1]
    batches = [torch.stack(full[i: i + BATCH]) for i in range(0, len(full), BATCH)]
    batches += [w[None] for w in windows if len(w) < N_CTX + 1]  # each file's last, shorter window
    with torch.no_grad():
        for batch in batches:
            logits = model(batch[:, :-1])
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten(),
                                                             reduction="sum"))
            count += batch[:, 1:].numel()
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, help="the first N held-out files (default: all)")
    parser.add_argument("--models", nargs="+", default=["pycode-4l", "smollm2-135m"])
    args = parser.parse_args()
    corpus = Corpus.from_stdlib("heldout")
    texts = corpus.texts()[: args.files]
    n_bytes = sum(len(t.encode()) for t in texts)
    print(f"heldout_loss: {len(texts)} held-out files, {n_bytes:,} bytes, windows of {N_CTX} tokens")
    per_byte, per_token = {}, {}
    for name in args.models:
        model = nt.zoo.load_model(name)
        total, count = model_loss(model, model.tokenizer, texts)
        per_byte[name], per_token[name] = total / n_bytes, total / count
        print(f"{name}: {per_token[name]:.3f} nats/token over {count:,} tokens, {per_byte[name]:.4f} nats/byte")
    code = load_code_tokenizer()
    bigram = Bigram.fit(token_stream(code, Corpus.from_stdlib("train").texts()), len(code))
    stream = token_stream(code, texts)
    pairs = heldout_windows(stream, N_CTX)
    previous, following = pairs[:, :-1].flatten(), pairs[:, 1:].flatten()
    bigram_token, unigram_token = bigram.loss(previous, following), bigram.unigram_loss(following)
    tokens_per_byte = len(stream) / n_bytes  # the code tokenizer's tokens per byte of this text
    print(f"bigram (code tokenizer): {bigram_token:.3f} nats/token, {bigram_token * tokens_per_byte:.4f} nats/byte; "
          f"unigram {unigram_token:.3f} nats/token, {unigram_token * tokens_per_byte:.4f} nats/byte")
    print(f"heldout_loss: smollm2_nats_per_byte={per_byte.get('smollm2-135m', float('nan')):.4f} "
          f"pycode_nats_per_byte={per_byte.get('pycode-4l', float('nan')):.4f} "
          f"bigram_nats_per_byte={bigram_token * tokens_per_byte:.4f} "
          f"smollm2_nats_per_token={per_token.get('smollm2-135m', float('nan')):.3f} "
          f"pycode_nats_per_token={per_token.get('pycode-4l', float('nan')):.3f}")


if __name__ == "__main__":
    main()
