"""One protocol for every dictionary, NPEFF or not, so that measurements and comparisons treat them alike.

A dictionary has components; non-negative coefficients per example (for the examples it was fitted to, and
for new ones); top examples per component; an intervention per component (a reusable context manager over the
model, with a magnitude and a sign); and a short description. NPEFF decompositions and gradient clusters
intervene in parameter space (``ParameterDictionary``: they also get random-direction controls); SAEs and
activation clusters intervene on activations at a TransformerLens hook.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float, Float64, Int
from torch import Tensor, nn

from .adapters import as_adapter
from .decomp import Decomposition, variant
from .examples import Examples, LabeledExamples
from .interventions import (
    KLProbe,
    ParameterPerturbation,
    calibrate_magnitude,
    dnpeff_direction,
    lrm_direction,
    perturb,
    sign_pattern,
)
from .params import ParamSpace
from .pefs import PEFs, compute_pefs, fisher_traces
from .targets import ClassRule, Target


@runtime_checkable
class Dictionary(Protocol):
    """What every dictionary offers (NPEFF decompositions, SAEs, gradient and activation clusters)."""

    name: str
    model: nn.Module
    train: LabeledExamples  # the examples it was fitted to (or described on), row i of train_coefficients

    @property
    def n_components(self) -> int: ...

    @property
    def train_coefficients(self) -> Float[Tensor, "n_train r"]: ...

    def coefficients(self, examples: LabeledExamples) -> Float[Tensor, "n r"]:
        """Non-negative coefficients of new examples."""

    def top_examples(self, j: int, k: int = 20) -> Int[Tensor, " k"]:
        """Indices of the training examples with the k largest coefficients on component j (positive ones)."""

    def intervention(self, j: int, magnitude: float, sign: int = 1):
        """A reusable context manager that changes the model's computation along component j."""

    def magnitude_bounds(self, j: int) -> tuple[float, float]:
        """(a natural first magnitude, the largest meaningful one) for searches over magnitudes."""

    def intervention_settings(self, j: int) -> dict[str, float | None]:
        """What component j's intervention was chosen with (e.g. D-NPEFF's mixing weight), recorded beside its
        selectivity; empty for none."""

    def figures(self) -> dict[str, float]:
        """Figures of its own shown beside it in comparisons (e.g. an SAE's reconstruction quality); empty for
        none."""

    def describe(self) -> str: ...


def as_labeled(examples: LabeledExamples | Examples) -> LabeledExamples:
    return examples if isinstance(examples, LabeledExamples) else LabeledExamples(examples)


def top_of(coefficients: Float[Tensor, " n"], k: int) -> Int[Tensor, " k"]:
    """Indices of the (at most) k largest positive entries, largest first."""
    top = coefficients.topk(min(k, len(coefficients)))
    return top.indices[top.values > 0]


def draw_baseline(n: int, exclude: Int[Tensor, " k"], size: int, seed: int) -> Int[Tensor, " size"]:
    """``size`` indices of range(n) outside ``exclude``, drawn with ``seed`` (sorted)."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[exclude] = False
    rest = torch.nonzero(keep).flatten()
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed))
    return rest[order[:size]].sort().values


def mean_ratio(a: Tensor, b: Tensor) -> float:
    """mean(a) / mean(b): inf when only b's mean is 0, NaN when both are."""
    top, base = float(a.mean()), float(b.mean())
    return top / base if base > 0 else (math.inf if top > 0 else math.nan)


class ParameterDictionary(ABC):
    """A dictionary whose components are directions in a ParamSpace: the intervention is
    theta + sign * magnitude * direction / ||direction||, magnitudes searched up to ``max_relative_magnitude``
    times the norm of the space's parameters."""

    name: str
    model: nn.Module
    train: LabeledExamples
    space: ParamSpace
    max_relative_magnitude: float = 1.0
    batch_size: int = 16  # examples per batch of gradient work

    @abstractmethod
    def direction(self, j: int) -> Float[Tensor, " size"]:
        """Component j's perturbation direction over the whole space."""

    @abstractmethod
    def support(self, j: int) -> Tensor:
        """Boolean mask over the space: where component j lives (for the support-restricted control)."""

    def top_examples(self, j: int, k: int = 20) -> Int[Tensor, " k"]:
        return top_of(self.train_coefficients[:, j].double().cpu(), k)

    def intervention(self, j: int, magnitude: float, sign: int = 1) -> ParameterPerturbation:
        return perturb(self.model, self.direction(j), self.space, magnitude, sign)

    def magnitude_bounds(self, j: int) -> tuple[float, float]:
        norm = float(torch.linalg.vector_norm(self.space.flat_values(as_adapter(self.model)).double()))
        return 0.05 * norm, self.max_relative_magnitude * norm

    def intervention_settings(self, j: int) -> dict[str, float | None]:
        return {}

    def figures(self) -> dict[str, float]:
        return {}

    def fisher_traces(self, examples: LabeledExamples | Examples, classes: ClassRule) -> Float64[Tensor, " n"]:
        """tr F_i over this dictionary's space per example, under the class rule ``classes`` (what normalised
        selectivity divides by)."""
        return fisher_traces(self.model, as_labeled(examples).examples, self.space, classes,
                             batch_size=self.batch_size)


class NPEFFDictionary(ParameterDictionary):
    """An NPEFF decomposition as a dictionary over ``model``.

    Coefficients of new examples come from their PEFs (computed with ``target`` and ``nnz``, as the training
    PEFs were) through ``Decomposition.fit_coefficients``. Interventions: LRM-NPEFF components move along g_j
    (``lrm_direction``, with optional semi-orthogonalisation ``max_abs_cos``); D-NPEFF components use the
    Fisher-weighted perturbation (``dnpeff_direction``) with the sign pattern of their top training examples
    and, with ``mix="auto"``, the mixing weight from ``mix_grid`` whose perturbation, calibrated to a mean KL of
    ``mix_kl_target`` on the ``n_top_train`` top training examples, is most selective against
    ``n_baseline_train`` other training examples (seeded); a grid of one weight is used as given.

    Args:
        train: the examples the decomposition was fitted to (row i of ``decomposition.W``), with answers for
            the D-NPEFF sign pattern (default: the model's own predictions).
        train_pefs: their PEFs: D-NPEFF takes the dataset-level Fisher from them, and new PEFs their ``nnz``.
    """

    def __init__(
        self,
        model: nn.Module,
        decomposition: Decomposition,
        train: LabeledExamples | Examples,
        target: Target,
        train_pefs: PEFs | None = None,
        *,
        nnz: int | None = None,
        name: str | None = None,
        mix: float | str = "auto",
        mix_grid: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        mix_kl_target: float = 0.5,
        fisher_floor: float = 1e-6,
        max_abs_cos: float | None = None,
        max_relative_magnitude: float = 1.0,
        n_top_train: int = 20,
        n_baseline_train: int = 200,
        seed: int = 0,
        batch_size: int = 16,
    ):
        self.model, self.decomposition, self.train, self.target = model, decomposition, as_labeled(train), target
        self.space = decomposition.space
        if len(self.train) != decomposition.W.shape[0]:
            raise ValueError(f"the decomposition has coefficients for {decomposition.W.shape[0]} examples but train "
                             f"has {len(self.train)}; pass the examples its PEFs were computed from, in order")
        self.dataset_fisher = train_pefs.dataset_fisher if train_pefs is not None else None
        self.variant = variant(decomposition.kind)
        if not self.variant.rank_one and self.dataset_fisher is None:
            raise ValueError("D-NPEFF perturbations need the dataset-level Fisher: pass train_pefs (the PEFs the "
                             "decomposition was fitted to, from compute_pefs)")
        if mix != "auto" and not (isinstance(mix, float) and 0 < mix < 1):
            raise ValueError(f"mix must be 'auto' or a float in (0, 1), got {mix!r}")
        if mix == "auto" and len(mix_grid) == 1:  # nothing to choose between: no searches
            mix = float(mix_grid[0])
        self.nnz = nnz if nnz is not None else (train_pefs.nnz if train_pefs is not None else None)
        self.name = name or self.variant.name
        self.mix, self.mix_grid, self.mix_kl_target = mix, tuple(mix_grid), mix_kl_target
        self.fisher_floor, self.max_abs_cos = fisher_floor, max_abs_cos
        self.max_relative_magnitude, self.n_top_train, self.seed = max_relative_magnitude, n_top_train, seed
        self.n_baseline_train = n_baseline_train
        self.batch_size = batch_size
        self._directions: dict[int, Tensor] = {}
        self.mixes: dict[int, float] = {}  # the mixing weight used per D-NPEFF component
        self._coefficients: dict[str, Tensor] = {}
        self._train_probe: KLProbe | None = None  # the training examples' original predictions, for the mix

    @property
    def n_components(self) -> int:
        return self.decomposition.n_components

    @property
    def train_coefficients(self) -> Float[Tensor, "n_train r"]:
        return self.decomposition.W

    def coefficients(self, examples: LabeledExamples | Examples) -> Float[Tensor, "n r"]:
        examples = as_labeled(examples).examples
        key = examples.fingerprint()
        if key not in self._coefficients:
            pefs = compute_pefs(self.model, examples, self.space, self.target, self.decomposition.kind,
                                nnz=self.nnz, batch_size=self.batch_size, progress=False)
            self._coefficients[key] = self.decomposition.fit_coefficients(pefs, progress=False)
        return self._coefficients[key]

    def support(self, j: int) -> Tensor:
        return self.decomposition.full(j).cpu() != 0

    def direction(self, j: int) -> Float[Tensor, " size"]:
        if j not in self._directions:
            if self.variant.rank_one:
                self._directions[j] = lrm_direction(self.decomposition, j, self.max_abs_cos).double().cpu()
            else:
                self.mixes[j], self._directions[j] = self._dnpeff_direction(j)
        return self._directions[j]

    def _dnpeff_direction(self, j: int) -> tuple[float, Tensor]:
        top = self.top_examples(j, self.n_top_train)
        if len(top) == 0:
            raise ValueError(f"component {j} has no training example with a positive coefficient; it has no "
                             "sign pattern to perturb along")
        answers = None if self.train.answers is None else self.train.answers[top]
        signs = sign_pattern(self.model, self.train.examples.subset(top), self.space, answers)
        if self.mix != "auto":
            return self.mix, dnpeff_direction(self.decomposition, j, self.dataset_fisher, signs, self.mix,
                                              self.fisher_floor)
        if self._train_probe is None:
            self._train_probe = KLProbe(self.model, self.train.examples, self.train.answers)
        probe = self._train_probe
        baseline = draw_baseline(len(self.train), top, self.n_baseline_train, self.seed + j)
        start, limit = self.magnitude_bounds(j)
        best = None
        for mix in self.mix_grid:
            d = dnpeff_direction(self.decomposition, j, self.dataset_fisher, signs, mix, self.fisher_floor)
            if not d.any():
                continue
            score = -math.inf
            for sign in (1, -1):
                def mean_kl(m: float, d=d, sign=sign) -> float:
                    return float(probe.run(perturb(self.model, d, self.space, m, sign), top)[0].mean())

                m, _, reached = calibrate_magnitude(mean_kl, self.mix_kl_target, start, limit=limit)
                if reached:
                    kl, _ = probe.run(perturb(self.model, d, self.space, m, sign), torch.cat([top, baseline]))
                    ratio = mean_ratio(kl[: len(top)], kl[len(top):])
                    score = max(score, -math.inf if math.isnan(ratio) else ratio)
            if best is None or score > best[0]:
                best = (score, mix, d)
        if best is None:
            raise ValueError(f"component {j} has no parameter with both a non-zero value and a non-zero sign "
                             "pattern; it cannot be perturbed")
        return best[1], best[2]

    def intervention_settings(self, j: int) -> dict[str, float | None]:
        return {"mix": self.mixes.get(j)}  # D-NPEFF's mixing weight, once its direction is built (None for LRM)

    def describe(self) -> str:
        return (f"{self.variant.display}: {self.n_components} components over {self.space.size:,} parameters in "
                f"{len(self.space.names)} tensors, fitted to the PEFs of {len(self.train)} examples")
