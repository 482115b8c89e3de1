"""Gradient clustering (Michaud et al., "quanta discovery from gradients") as a dictionary.

Per-example gradients of the answer's log-probability (``per_example_grads``) over every parameter except
LayerNorm and embeddings, L2-normalised; cosine similarity C, affinity 1 - arccos(C)/pi; spectral clustering on
the precomputed affinity. Coefficients of any example are its gradient's cosine with each cluster's mean
(normalised) gradient, clipped at 0, so the argmax is the nearest cluster mean; the intervention perturbs the
parameters along the cluster's mean gradient direction.

Memory: n x size normalised gradients (float32) and the n x n affinity. Above ``SKETCH_ABOVE`` parameters the
gradients are compared through a seeded count sketch of ``SKETCH_DIM`` entries instead (each parameter adds
its gradient, with a random sign, to one random entry): inner products are kept in expectation, with an error
of about 1/sqrt(SKETCH_DIM) on a cosine, and memory is n x SKETCH_DIM. Coefficients are then cosines of
sketches; the intervention directions, in the full space, take one more gradient pass over the training
examples when first needed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..adapters import as_adapter
from ..dictionaries import ParameterDictionary, as_labeled
from ..examples import Examples, LabeledExamples
from ..interventions import target_log_probs
from ..params import ParamSpace
from ..pefs import AnswerLogProb, per_example_grads

SKETCH_ABOVE = 2**20
SKETCH_DIM = 2**16
GRADIENT_MEMORY = 2**31  # bytes a batch's gradients may take: float32, plus their float64 unit copies

def default_space(model: nn.Module) -> ParamSpace:
    """Every parameter but LayerNorm and embedding ones (TL names: ``embed.W_E``, ``pos_embed.W_pos``, ``*.ln*.w``)."""
    names = [n for n in as_adapter(model).named_parameters()
             if not n.startswith(("embed.", "pos_embed.")) and not fnmatch.fnmatch(n, "*ln*")]
    return ParamSpace(model, include=names)


class GradientClustering(ParameterDictionary):
    """Spectral clusters of normalised answer gradients; fitted on ``train`` at construction.

    Args:
        n_clusters: number of clusters (components).
        space: the parameters (default: all but LayerNorm and embeddings).
        batch_size: at most this many examples per gradient batch; fewer where a batch's gradients would take
            more than ``GRADIENT_MEMORY`` (``gradient_batch``: one example at a time for a 100M-parameter space).
        seed: seeds spectral clustering (and the sketch, unless ``sketch_seed`` is given).
        sketch_dim: compare gradients through a count sketch of this many entries (default: ``SKETCH_DIM`` for
            spaces over ``SKETCH_ABOVE`` parameters, else none: exact cosines).
        sketch_seed: seeds the count sketch (default: ``seed``).
        memo: the last examples' unit gradients, shared by dictionaries of the same model, space and sketch so that
            each set of examples takes one gradient pass among them (``for_seeds`` makes one).
    """

    def __init__(self, model: nn.Module, train: LabeledExamples | Examples, n_clusters: int, *,
                 space: ParamSpace | None = None, name: str = "gradient_clustering", batch_size: int = 16,
                 seed: int = 0, max_relative_magnitude: float = 1.0, sketch_dim: int | None = None,
                 sketch_seed: int | None = None, memo: GradientMemo | None = None, progress: bool = False):
        self.model, self.train, self.name = model, as_labeled(train), name
        self.space = space if space is not None else default_space(model)
        self.batch_size = gradient_batch(self.space.size, batch_size)
        self.seed, self.max_relative_magnitude = seed, max_relative_magnitude
        if not 2 <= n_clusters <= len(self.train):
            raise ValueError(f"n_clusters must be between 2 and the number of examples ({len(self.train)}), "
                             f"got {n_clusters}")
        if sketch_dim is None and self.space.size > SKETCH_ABOVE:
            sketch_dim = SKETCH_DIM
        self.sketch_seed = seed if sketch_seed is None else sketch_seed
        self.sketch = None if sketch_dim is None else CountSketch(self.space.size, sketch_dim, self.sketch_seed)
        self.memo = memo
        rows = self._rows(self.train, progress)  # unit gradients, or their sketches
        self.labels, self.means = spectral_clusters(rows, n_clusters, seed)
        self._directions = None if self.sketch else self.means  # full-space mean gradients, computed when needed
        self._train_coefficients = self._coefficients_of(rows)

    @classmethod
    def for_seeds(cls, model: nn.Module, train: LabeledExamples | Examples, n_clusters: int, seeds: list[int],
                  **kwargs) -> list[GradientClustering]:
        """One dictionary per clustering seed from one gradient pass per set of examples: the sketch is seeded by
        the first seed and the dictionaries share a memo of the last examples' gradients (the train set's, then
        each held-out set's while the seeds take its coefficients in turn). Each equals the dictionary built alone
        with that ``seed`` and ``sketch_seed=seeds[0]``; the seeds' spread is then the clustering's alone."""
        if not seeds:
            raise ValueError("for_seeds needs at least one seed")
        train, kwargs = as_labeled(train), {"sketch_seed": seeds[0], **kwargs, "memo": GradientMemo()}
        return [cls(model, train, n_clusters, seed=s, **kwargs) for s in seeds]

    def _grads(self, examples: LabeledExamples, progress: bool):
        """(start, stop, answer gradients [b, size] in the model's dtype, on the CPU) per batch of ``examples``."""
        answers = examples.answers
        if answers is None:  # the model's own answers
            answers = target_log_probs(self.model, examples.examples).argmax(-1)
        for block in per_example_grads(self.model, examples.examples, self.space, AnswerLogProb(answers),
                                       batch_size=self.batch_size, progress=progress):
            yield block.start, block.stop, block.grads[:, 0].cpu()

    def _unit(self, grads: Float[Tensor, "b size"]) -> Float[Tensor, "b d"]:
        """Unit gradients (float64), or with a sketch their unit sketches: the sketch is linear and the rows are
        renormalised after it, so it takes the raw gradients (no float64 copies of a float32 model's)."""
        return _unit_rows(self.sketch(grads).double() if self.sketch else grads.double())

    def _rows(self, examples: LabeledExamples | Examples, progress: bool) -> Float[Tensor, "n d"]:
        """The examples' unit gradients (float32), or with a sketch their sketches, renormalised (from the memo
        when it holds them)."""
        if self.memo is not None:
            key = (id(self.model), tuple(self.space.names), self.sketch and (self.sketch.dim, self.sketch_seed))
            return self.memo.rows(examples, key, lambda: self._compute_rows(as_labeled(examples), progress))
        return self._compute_rows(as_labeled(examples), progress)

    def _compute_rows(self, examples: LabeledExamples, progress: bool) -> Float[Tensor, "n d"]:
        out = torch.empty(len(examples), self.sketch.dim if self.sketch else self.space.size, dtype=torch.float32)
        for start, stop, grads in self._grads(examples, progress):
            out[start:stop] = self._unit(grads).float()
        return out

    def _coefficients_of(self, rows: Float[Tensor, "n d"]) -> Float[Tensor, "n r"]:
        return (rows.double() @ self.means.T).clamp(min=0)

    @property
    def n_components(self) -> int:
        return len(self.means)

    @property
    def train_coefficients(self) -> Float[Tensor, "n r"]:
        return self._train_coefficients

    def coefficients(self, examples: LabeledExamples | Examples) -> Float[Tensor, "n r"]:
        if self.memo is not None:
            return self._coefficients_of(self._rows(examples, progress=False))
        out = torch.empty(len(examples), self.n_components, dtype=torch.float64)
        for start, stop, grads in self._grads(as_labeled(examples), progress=False):
            out[start:stop] = self._coefficients_of(self._unit(grads))
        return out

    def direction(self, j: int) -> Float[Tensor, " size"]:
        if self._directions is None:  # sketched: the clusters' mean unit gradients in the full space
            sums = torch.zeros(self.n_components, self.space.size, dtype=torch.float64)
            for start, stop, grads in self._grads(self.train, progress=False):
                sums.index_add_(0, self.labels[start:stop], _unit_rows(grads.double()))
            self._directions = _unit_rows(sums)
        return self._directions[j]

    def support(self, j: int) -> Tensor:
        return self.direction(j) != 0

    def describe(self) -> str:
        return (f"gradient clustering: {self.n_components} spectral clusters of answer gradients over "
                f"{self.space.size:,} parameters, fitted to {len(self.train)} examples")


def spectral_clusters(rows: Float[Tensor, "n d"], n_clusters: int, seed: int = 0
                      ) -> tuple[Tensor, Float[Tensor, "r d"]]:
    """Spectral clusters of unit rows on the affinity 1 - arccos(cos)/pi: each row's cluster and each cluster's
    mean row, renormalised (float64)."""
    from sklearn.cluster import SpectralClustering

    affinity = 1 - torch.arccos((rows @ rows.T).double().clamp(-1, 1)) / torch.pi
    clustering = SpectralClustering(n_clusters, affinity="precomputed", random_state=seed)
    labels = torch.as_tensor(clustering.fit_predict(affinity.numpy()))
    return labels, _unit_rows(torch.stack([rows[labels == c].double().mean(0) for c in range(n_clusters)]))


def gradient_batch(size: int, requested: int) -> int:
    """Examples per gradient batch: ``requested``, or fewer (at least one) so that a batch's gradients over ``size``
    parameters (float32, 4 bytes each) and their float64 unit copies (8 bytes, twice) fit ``GRADIENT_MEMORY``."""
    return max(1, min(requested, GRADIENT_MEMORY // (20 * size)))


def _unit_rows(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp(min=1e-300)


class GradientMemo:
    """The unit gradient rows of the last examples asked for, kept while the same examples object comes back
    with the same key (model, parameters and sketch)."""

    def __init__(self):
        self._examples, self._key, self._rows = None, None, None

    def rows(self, examples: object, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        if self._examples is not examples or self._key != key:
            self._examples, self._key, self._rows = None, None, None  # the old rows go before new ones come
            self._examples, self._key, self._rows = examples, key, compute()
        return self._rows


class CountSketch:
    """A seeded linear map R^size -> R^dim: entry j goes, with a random sign, to a random one of ``dim`` entries.
    E[<S x, S y>] = <x, y>, with a variance of about |x|^2 |y|^2 / dim."""

    def __init__(self, size: int, dim: int, seed: int = 0):
        if dim < 1:
            raise ValueError(f"the sketch needs dim >= 1, got {dim}")
        generator = torch.Generator().manual_seed(seed)
        self.dim = dim  # int64 buckets: index_add_ over dim 1 takes a slow path with int32 ones (30x here)
        self.bucket = torch.randint(dim, (size,), generator=generator)
        self.sign = torch.randint(2, (size,), generator=generator, dtype=torch.float32) * 2 - 1

    def __call__(self, x: Float[Tensor, "b size"]) -> Float[Tensor, "b dim"]:
        """S x in the dtype of x (each entry sums about size/dim terms: float32 keeps them to ~1e-6, far below
        the sketch's own error of ~1/sqrt(dim))."""
        out = torch.zeros(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        return out.index_add_(1, self.bucket.to(x.device), x * self.sign.to(x.device, x.dtype))
