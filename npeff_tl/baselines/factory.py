"""The baselines a comparison runs beside NPEFF, built from ``CompareConfig``: TopK SAEs (one per width) and
activation k-means at the label-free hook, gradient clustering and, with ``oracle_hooks``, an SAE and k-means
whose hook is chosen with the labels (an oracle advantage, named as such)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..config import CompareConfig
from ..examples import LabeledExamples
from ..params import ParamSpace
from .activations import middle_hook, residual_hooks
from .gradient_clustering import GradientClustering
from .kmeans import ActivationKMeans
from .sae import INSTALL_HINT, SAEDictionary, evaluate_sae, load_sae, sae_lens_available, train_sae

logger = logging.getLogger(__name__)


def build_baselines(model: nn.Module, train: LabeledExamples, test: LabeledExamples, config: CompareConfig,
                    n_components: int, sae_dir: Callable[[int, str], Path],
                    say: Callable[[str], None] = lambda _: None) -> list:
    """The baseline dictionaries fitted to ``train`` (SAEs are evaluated on ``test``); ``sae_dir(width, hook)``:
    where each SAE is saved, and loaded from on a re-run; ``say`` reports each SAE's hook. Without SAE-Lens
    installed, the SAE rows are left out with a warning."""
    c = config
    widths = list(zip(c.sae_widths, c.sae_k))
    if widths and not sae_lens_available():
        logger.warning("SAE baselines left out: SAE-Lens is not installed here; for them, %s", INSTALL_HINT)
        widths = []
    hook = c.hook or middle_hook(model)
    oracle = (c.hooks or residual_hooks(model)) if c.oracle_hooks else []
    if oracle and train.labels is None:
        raise ValueError("compare.oracle_hooks chooses a hook with the examples' labels, but they have none; "
                         "turn it off or give labels")

    def sae_at(hook_name: str, width: int, k: int, name: str, evaluate: bool = True) -> SAEDictionary:
        path = sae_dir(width, hook_name)
        sae = (load_sae(path) if (path / "cfg.json").exists() else
               train_sae(model, train, hook_name, width, k=k, steps=c.sae_steps, seed=c.seed, out=path, progress=False))
        figures = evaluate_sae(model, sae, test) if evaluate else None
        return SAEDictionary(model, sae, train, name=name, evaluation=figures)

    out = []
    for width, k in widths:
        out.append(sae_at(hook, width, k, f"sae_{width}"))
        if oracle:
            name = f"sae_{width}_oracle_hook"
            chosen = with_labels([sae_at(h, width, k, name, evaluate=False) for h in oracle])
            out.append(sae_at(chosen.hook_name, width, k, name))  # the chosen one again, with its figures
        for d in out[-2 if oracle else -1:]:
            say(f"  {d.name}: TopK k={k} at {d.hook_name}")
    if c.gradient_clustering:
        space = ParamSpace(model, include=c.gradient_include) if c.gradient_include else None
        out.append(GradientClustering(model, train, n_components, space=space, seed=c.seed))
    if c.activation_kmeans:
        out.append(ActivationKMeans(model, train, hook, n_components, seed=c.seed))
        if oracle:
            out.append(with_labels([ActivationKMeans(model, train, h, n_components, seed=c.seed,
                                                     name="activation_kmeans_oracle_hook") for h in oracle]))
    return out


def with_labels(candidates: list):
    """The candidate (one per hook) with the best AMI against the labels on the train split: an oracle choice."""
    from ..evaluation.metrics import train_ami

    return max(candidates, key=train_ami)
