"""Local models, so that nothing needs a hub. Two kinds of directory:

- a checkpoint of a HookedTransformer: ``config.json`` (the HookedTransformerConfig), ``model.safetensors`` (the
  state dict) and, when the model has one, its tokenizer (``save_pretrained`` files); ``save_checkpoint`` writes
  one;
- a Hugging Face model directory (``save_pretrained`` of the model and its tokenizer; its ``config.json`` names a
  ``model_type``), loaded through TransformerLens's ``TransformerBridge``.

``load_model(PATH)`` and ``--set model.name=PATH`` read either."""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .store import atomic_directory, save_json


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write a HookedTransformer as a local checkpoint that ``load_model`` (and ``--set model.name=PATH``) reads."""
    from .adapters.hooked import is_hooked_transformer

    if not is_hooked_transformer(model):
        raise TypeError(f"save_checkpoint writes HookedTransformers, not a {type(model).__name__}; for a "
                        "TransformerBridge, save the Hugging Face model and its tokenizer with save_pretrained "
                        "(before wrapping it) and pass that directory")
    from safetensors.torch import save_file

    config = model.cfg.to_dict()
    config["dtype"] = str(config["dtype"]).removeprefix("torch.")
    config.pop("device", None)
    with atomic_directory(path) as tmp:
        save_json(config, tmp / "config.json")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(str(tmp))
    return Path(path)


def load_checkpoint(path: Path, device: str = "cpu") -> nn.Module:
    """The model in directory ``path`` (a checkpoint or a Hugging Face model directory), in eval mode on
    ``device``."""
    from safetensors.torch import load_file

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model directory: it lacks config.json (write one with "
                                "npeff_tl.save_checkpoint(model, path), or save_pretrained a Hugging Face model)")
    values = json.loads((path / "config.json").read_text())
    if "model_type" in values:
        return load_hf_directory(path, device)
    from .tl_models import build_model, load_state

    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: it lacks model.safetensors (write one with "
                                "npeff_tl.save_checkpoint(model, path))")
    values["device"] = device
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = build_model(values, tokenizer=tokenizer)
    load_state(model, load_file(str(path / "model.safetensors"), device=device))
    return model.eval()


def load_hf_directory(path: Path, device: str = "cpu") -> nn.Module:
    """A Hugging Face model directory (model and tokenizer files) as a ``TransformerBridge``, in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    try:
        return TransformerBridge.boot_transformers(str(path), device=device).eval()
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path} looks like a Hugging Face model directory but TransformerBridge cannot load it: "
                         f"{str(error).splitlines()[0]}") from None
