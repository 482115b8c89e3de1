"""Gradient clustering (Michaud et al., "quanta discovery from gradients") as a dictionary.

Per-example gradients of the answer's log-probability (``per_example_grads``) over every parameter except
LayerNorm and embeddings, L2-normalised; cosine similarity C, affinity 1 - arccos(C)/pi; spectral clustering on
the precomputed affinity. Coefficients of any example are its gradient's cosine with each cluster's mean
(normalised) gradient, clipped at 0, so the argmax is the nearest cluster mean; the intervention perturbs the
parameters along the cluster's mean gradient direction. Memory: the n x size normalised gradients (float32)
and the n x n affinity.
"""

from __future__ import annotations

import fnmatch

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..dictionaries import ParameterDictionary, as_labeled
from ..examples import Examples, LabeledExamples
from ..interventions import target_log_probs
from ..params import ParamSpace
from ..pefs import AnswerLogProb, per_example_grads

def default_space(model: nn.Module) -> ParamSpace:
    """Every parameter but LayerNorm and embedding ones (TL names: ``embed.W_E``, ``pos_embed.W_pos``, ``*.ln*.w``)."""
    names = [n for n, _ in model.named_parameters()
             if not n.startswith(("embed.", "pos_embed.")) and not fnmatch.fnmatch(n, "*ln*")]
    return ParamSpace(model, include=names)


class GradientClustering(ParameterDictionary):
    """Spectral clusters of normalised answer gradients; fitted on ``train`` at construction.

    Args:
        n_clusters: number of clusters (components).
        space: the parameters (default: all but LayerNorm and embeddings).
        batch_size: examples per gradient batch.
        seed: seeds spectral clustering.
    """

    def __init__(self, model: nn.Module, train: LabeledExamples | Examples, n_clusters: int, *,
                 space: ParamSpace | None = None, name: str = "gradient_clustering", batch_size: int = 16,
                 seed: int = 0, max_relative_magnitude: float = 1.0, progress: bool = False):
        from sklearn.cluster import SpectralClustering

        self.model, self.train, self.name = model, as_labeled(train), name
        self.space = space if space is not None else default_space(model)
        self.batch_size, self.seed, self.max_relative_magnitude = batch_size, seed, max_relative_magnitude
        if not 2 <= n_clusters <= len(self.train):
            raise ValueError(f"n_clusters must be between 2 and the number of examples ({len(self.train)}), "
                             f"got {n_clusters}")
        grads = self._unit_grads(self.train, progress)
        cosine = (grads @ grads.T).double().clamp(-1, 1)
        affinity = 1 - torch.arccos(cosine) / torch.pi
        clustering = SpectralClustering(n_clusters, affinity="precomputed", random_state=seed)
        self.labels = torch.as_tensor(clustering.fit_predict(affinity.numpy()))
        means = torch.stack([grads[self.labels == c].double().mean(0) for c in range(n_clusters)])
        self.means = means / torch.linalg.vector_norm(means, dim=1, keepdim=True).clamp(min=1e-300)
        self._train_coefficients = self._coefficients_of(grads)

    def _unit_grads(self, examples: LabeledExamples, progress: bool) -> Float[Tensor, "n size"]:
        answers = examples.answers
        if answers is None:  # the model's own answers
            answers = target_log_probs(self.model, examples.examples).argmax(-1)
        out = torch.empty(len(examples), self.space.size, dtype=torch.float32)
        for block in per_example_grads(self.model, examples.examples, self.space, AnswerLogProb(answers),
                                       batch_size=self.batch_size, progress=progress):
            g = block.grads[:, 0].double()
            out[block.start:block.stop] = (g / torch.linalg.vector_norm(g, dim=1, keepdim=True).clamp(min=1e-300)).float().cpu()
        return out

    def _coefficients_of(self, grads: Float[Tensor, "n size"]) -> Float[Tensor, "n r"]:
        return (grads.double() @ self.means.T).clamp(min=0)

    @property
    def n_components(self) -> int:
        return len(self.means)

    @property
    def train_coefficients(self) -> Float[Tensor, "n r"]:
        return self._train_coefficients

    def coefficients(self, examples: LabeledExamples | Examples) -> Float[Tensor, "n r"]:
        return self._coefficients_of(self._unit_grads(as_labeled(examples), progress=False))

    def direction(self, j: int) -> Float[Tensor, " size"]:
        return self.means[j]

    def support(self, j: int) -> Tensor:
        return self.means[j] != 0

    def describe(self) -> str:
        return (f"gradient clustering: {self.n_components} spectral clusters of answer gradients over "
                f"{self.space.size:,} parameters, fitted to {len(self.train)} examples")
