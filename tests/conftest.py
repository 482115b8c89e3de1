"""Shared fixtures: tiny HookedTransformers built from configs (no downloads), fixed thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hidden hub call fails fast instead of hanging

import json

import pytest
import torch

from helpers.models import make_model
from npeff_tl.cli import main as cli_main

# Tiny models on 2 shared cores: one thread is both fastest and repeatable. With torch's default of one
# OpenMP thread per core, a competing process can slow a tiny forward pass by ~80x.
torch.set_num_threads(int(os.environ.get("NPEFF_TL_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def model64():
    return make_model(torch.float64)


@pytest.fixture(scope="session")
def tokens():
    return torch.randint(0, 23, (10, 9), generator=torch.Generator().manual_seed(1))


# -- a run directory made by the stage commands on a user's own model (local checkpoint) and data (JSONL) ------

STAGE_SETTINGS = ["--set", "fit.n_components=4", "--set", "pefs.nnz=1024", "--set", "selectivity.n_top=5",
                  "--set", "selectivity.n_baseline=40", "--set", "selectivity.n_measured=2", "--set", "compare.sae_widths=[8]",
                  "--set", "compare.sae_k=[2]", "--set", "compare.sae_steps=30",
                  "--set", 'compare.hooks=["blocks.1.hook_resid_pre"]', "--set", "compare.selectivity=false"]


@pytest.fixture(scope="session")
def own_model_and_data(tmp_path_factory):
    """A zoo model saved as a local checkpoint, and 140 of its task prompts as JSONL (text answers, labels)."""
    import npeff_tl as nt

    root = tmp_path_factory.mktemp("own")
    model, data = nt.zoo.load("tasks-2l", n_train=20, n_test=1)
    nt.save_checkpoint(model, root / "checkpoint")
    rows = data["train"]
    answers = model.to_str_tokens(torch.tensor(rows["answer"]), prepend_bos=False)
    with open(root / "prompts.jsonl", "w") as f:
        for text, answer, label in zip(rows["text"], answers, rows["strategy"]):
            f.write(json.dumps({"prompt": text, "answer": answer, "label": label}) + "\n")
    return root, model, data


@pytest.fixture(scope="session")
def staged_run(own_model_and_data):
    """`npeff-tl pefs`, then `fit`, `selectivity`, `compare`, `report` on the user's checkpoint and JSONL."""
    root, _, _ = own_model_and_data
    out = root / "run"
    config = root / "settings.toml"
    config.write_text(f'[model]\nname = "{root / "checkpoint"}"\n\n[data]\nsource = "{root / "prompts.jsonl"}"\n')
    assert cli_main(["pefs", "--out", str(out), "--config", str(config), "--quiet", *STAGE_SETTINGS]) == 0
    for stage in ("fit", "selectivity", "compare", "report"):
        assert cli_main([stage, "--out", str(out), "--quiet"]) == 0, stage  # settings come from DIR/config.json
    return out
