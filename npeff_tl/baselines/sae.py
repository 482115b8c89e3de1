"""SAEs through SAE-Lens as dictionaries: train offline with SAE-Lens's own trainer, load from disk, or wrap.

Coefficients are feature activations at the example's target position (or pooled over its positions up to the
target: "max" or "mean"). The intervention scales feature j by (1 - sign * magnitude) at every position through
a forward-hook splice that keeps the SAE's reconstruction error: the activation becomes x + decode(f') - decode(f),
so with nothing changed the model's output is unchanged, and magnitude 1 with sign +1 ablates the feature.
SAE-Lens's own evaluation figures (CE loss recovered, explained variance, L0) sit beside it.
sae_lens (slow to import; it imports wandb) is imported only here, with wandb disabled. It is an optional
dependency (``pip install 'npeff-tl[sae]'``; SAE-Lens needs transformer-lens < 4): everything else in npeff_tl
runs without it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from unittest import mock
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..dictionaries import as_labeled, top_of
from ..examples import Examples, LabeledExamples
from ..interventions import HookIntervention
from ..store import atomic_directory
from .activations import check_hook, hook_activations, sequence_activations

POOLINGS = ("target", "max", "mean")


INSTALL_HINT = "pip install 'npeff-tl[sae]' (SAE-Lens needs transformer-lens < 4)"


def _sae_lens():
    os.environ.setdefault("WANDB_MODE", "disabled")
    try:
        import sae_lens
    except ImportError as error:
        raise ImportError(f"SAE baselines need SAE-Lens, which does not import here ({error}); install it with "
                          f"{INSTALL_HINT}") from error
    return sae_lens


@functools.cache
def sae_lens_available() -> bool:
    """Whether SAE-Lens imports here (it is an optional dependency)."""
    try:
        _sae_lens()
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _quiet(progress: bool):
    """Silence SAE-Lens's trainer bar (it takes no switch) by giving its module a disabled tqdm."""
    from sae_lens.training import sae_trainer

    if progress:
        yield
        return
    with mock.patch.object(sae_trainer, "tqdm", functools.partial(sae_trainer.tqdm, disable=True)):
        yield


def train_sae(
    model: nn.Module,
    examples: LabeledExamples | Examples,
    hook_name: str,
    d_sae: int,
    *,
    architecture: str = "topk",
    k: int = 8,
    l1_coefficient: float = 1.0,
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
    out: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Train an SAE with SAE-Lens's trainer (``SAETrainer``, wandb off, nothing written unless ``out``) on the
    activations at ``hook_name`` of every real token of the examples' sequences; returns the inference SAE
    (``TopKSAE`` for ``architecture="topk"``, ``StandardSAE`` with an L1 penalty for ``"standard"``). With
    ``out``, it is saved there (``SAE.load_from_disk`` / ``load_sae`` reads it)."""
    sl = _sae_lens()
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata

    if architecture not in ("topk", "standard"):
        raise ValueError(f"architecture must be 'topk' or 'standard', got {architecture!r}")
    if architecture == "topk" and not 1 <= k <= d_sae:
        raise ValueError(f"a TopK SAE needs 1 <= k <= d_sae, got k={k} with d_sae={d_sae}; lower k or widen the SAE")
    acts = hook_activations(model, as_labeled(examples).examples, hook_name, positions="all")
    metadata = SAEMetadata(hook_name=hook_name, context_size=int(as_labeled(examples).examples.tokens.shape[1]),
                           prepend_bos=False, model_name=str(getattr(getattr(model, "cfg", None), "model_name", "")))
    batch_size = min(batch_size, len(acts))

    def batches():  # a seeded, endless stream of [batch_size, d_in] rows
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(acts), generator=generator)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield acts[order[start:start + batch_size]]

    with torch.random.fork_rng(), _quiet(progress):
        torch.manual_seed(seed)  # the SAE's initialisation
        if architecture == "topk":
            sae = sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(d_in=acts.shape[1], d_sae=d_sae, k=k, metadata=metadata))
        else:
            sae = sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(
                d_in=acts.shape[1], d_sae=d_sae, l1_coefficient=l1_coefficient, l1_warm_up_steps=steps // 10,
                metadata=metadata))
        config = SAETrainerConfig(
            total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr, lr_end=lr,
            lr_scheduler_name="constant", device="cpu", dead_feature_window=min(200, steps),
            feature_sampling_window=max(steps, 1), n_checkpoints=0, checkpoint_path=None,
            save_final_checkpoint=False, logger=sl.LoggingConfig(log_to_wandb=False))
        sae = sl.SAETrainer(cfg=config, sae=sae, data_provider=batches()).fit()
    if out is not None:
        with atomic_directory(out) as tmp:
            sae.save_inference_model(str(tmp))
    state = sae.state_dict()
    sae.process_state_dict_for_saving_inference(state)
    inference = sl.SAE.from_dict(sae.cfg.get_inference_sae_cfg_dict())
    inference.load_state_dict(state)
    return inference.eval()


def load_sae(path: str | os.PathLike, device: str = "cpu"):
    """An SAE saved by SAE-Lens (``save_inference_model``) or by ``train_sae(out=...)``."""
    if not (Path(path) / "cfg.json").is_file():
        raise FileNotFoundError(f"{path} holds no SAE (no cfg.json); save one with train_sae(out=...) or "
                                "sae.save_inference_model(path)")
    return _sae_lens().SAE.load_from_disk(str(path), device=device).eval()


class _TokenBatches:
    """The four things ``sae_lens.evals.run_evals`` reads from an activation store, over a fixed token tensor."""

    def __init__(self, tokens: Tensor, batch_size: int):
        self.tokens, self.store_batch_size_prompts, self.context_size = tokens, batch_size, int(tokens.shape[1])
        self._next = 0

    def get_batch_tokens(self, batch_size: int | None = None, **_) -> Tensor:
        size = batch_size or self.store_batch_size_prompts
        index = torch.arange(self._next, self._next + size) % len(self.tokens)
        self._next += size
        return self.tokens[index]

    def reset_input_dataset(self) -> None:
        self._next = 0


def evaluate_sae(model: nn.Module, sae, examples: LabeledExamples | Examples, batch_size: int = 32) -> dict[str, float]:
    """SAE-Lens's own figures (``run_evals``) on the examples' sequences: CE loss recovered, explained variance
    and L0, over real tokens only (the sequences are cut to the shortest one's length, so no padding counts)."""
    _sae_lens()
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler

    examples = as_labeled(examples).examples
    tokens = examples.tokens[:, : int(examples.lengths.min())]
    n_batches = max(1, len(tokens) // batch_size)
    config = EvalConfig(batch_size_prompts=batch_size, n_eval_reconstruction_batches=n_batches,
                        n_eval_sparsity_variance_batches=n_batches, compute_ce_loss=True, compute_kl=False,
                        compute_variance_metrics=True, compute_sparsity_metrics=True, compute_l2_norms=False,
                        compute_featurewise_density_statistics=False, compute_featurewise_weight_based_metrics=False)
    metrics, _ = run_evals(sae, _TokenBatches(tokens, batch_size), model, ActivationScaler(), config,
                           exclude_special_tokens=False)
    return {"ce_loss_recovered": float(metrics["model_performance_preservation"]["ce_loss_score"]),
            "explained_variance": float(metrics["reconstruction_quality"]["explained_variance"]),
            "l0": float(metrics["sparsity"]["l0"])}


class SAEDictionary:
    """An SAE-Lens SAE at its hook as a dictionary over ``model``; ``train`` are the examples its components
    are described on (top examples, strategies).

    Args:
        pooling: "target" (the feature activation at the target position), or "max" / "mean" over the example's
            positions up to its target.
        evaluation: figures to show beside it (e.g. ``evaluate_sae``), None for none.
    """

    def __init__(self, model: nn.Module, sae, train: LabeledExamples | Examples, *, name: str | None = None,
                 pooling: str = "target", evaluation: dict[str, float] | None = None, batch_size: int = 64):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.model, self.sae, self.train, self.pooling = model, sae, as_labeled(train), pooling
        self.hook_name = sae.cfg.metadata.hook_name
        if self.hook_name is None:
            raise ValueError("the SAE has no hook (sae.cfg.metadata.hook_name is None); set it to the TL hook it "
                             "reads, e.g. 'blocks.1.hook_resid_pre'")
        check_hook(model, self.hook_name)
        self.name = name or f"sae_{sae.cfg.d_sae}"
        self.evaluation, self.batch_size = evaluation, batch_size
        self._train_coefficients = self.coefficients(self.train)

    @property
    def n_components(self) -> int:
        return int(self.sae.cfg.d_sae)

    @property
    def train_coefficients(self) -> Float[Tensor, "n r"]:
        return self._train_coefficients

    def coefficients(self, examples: LabeledExamples | Examples) -> Float[Tensor, "n r"]:
        examples = as_labeled(examples).examples
        device = next(self.sae.parameters()).device
        out = []
        for start in range(0, len(examples), self.batch_size):
            index = torch.arange(start, min(start + self.batch_size, len(examples)))
            sequences, positions = examples.seq_index[index], examples.position[index]
            acts = sequence_activations(self.model, examples.tokens[sequences], self.hook_name)
            with torch.no_grad():
                features = self.sae.encode(acts.to(device)).double().cpu()  # [b, seq, d_sae]
            if self.pooling == "target":
                out.append(features[torch.arange(len(index)), positions])
            else:
                upto = (torch.arange(features.shape[1])[None] <= positions[:, None])[..., None]
                if self.pooling == "max":
                    out.append(features.masked_fill(~upto, 0).amax(1))
                else:
                    out.append((features * upto).sum(1) / upto.sum(1))
        return torch.cat(out).clamp(min=0)

    def top_examples(self, j: int, k: int = 20) -> Tensor:
        return top_of(self._train_coefficients[:, j], k)

    def intervention(self, j: int, magnitude: float, sign: int = 1) -> HookIntervention:
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        sae = self.sae

        def splice(x: Tensor, hook) -> Tensor:
            f = sae.encode(x.to(sae.W_dec.dtype))
            edited = f.clone()
            edited[..., j] = f[..., j] * (1 - sign * magnitude)
            return x + (sae.decode(edited) - sae.decode(f)).to(x.dtype)

        return HookIntervention(self.model, [(self.hook_name, splice)])

    def magnitude_bounds(self, j: int) -> tuple[float, float]:
        return 0.25, 100.0  # 1 removes it; beyond, it is reversed (sign +1) or amplified (sign -1)

    def intervention_settings(self, j: int) -> dict[str, float | None]:
        return {}

    def figures(self) -> dict[str, float]:
        return dict(self.evaluation or {})

    def describe(self) -> str:
        figures = "" if not self.evaluation else " (" + ", ".join(f"{k} {v:.3g}" for k, v in self.evaluation.items()) + ")"
        return (f"SAE ({self.sae.cfg.architecture()}, {self.n_components} features) at {self.hook_name}, "
                f"{self.pooling} pooling{figures}")
