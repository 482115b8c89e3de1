"""Activation k-means as a dictionary: clusters of the activations at a hook, at the target position.

Coefficients of an example are exp(-||x - c_j||^2 / (2 s^2)) for each centroid c_j (s^2: the mean squared
distance of training activations to their own centroid), so the argmax is the nearest centroid. The intervention
projects the cluster's direction (its centroid minus the mean training activation, unit norm) out of the
activation at the hook, at every position: x - sign * magnitude * (x . u) u (magnitude 1 with sign +1 removes
the direction, larger values reverse it, sign -1 amplifies it).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..dictionaries import as_labeled, top_of
from ..examples import Examples, LabeledExamples
from ..interventions import HookIntervention
from .activations import hook_activations


class ActivationKMeans:
    """k-means (scikit-learn, ``n_init`` restarts from ``seed``) on activations at ``hook_name``; fitted on ``train``."""

    def __init__(self, model: nn.Module, train: LabeledExamples | Examples, hook_name: str, n_clusters: int, *,
                 name: str = "activation_kmeans", seed: int = 0, n_init: int = 10, batch_size: int = 64):
        from sklearn.cluster import KMeans

        self.model, self.train, self.hook_name, self.name = model, as_labeled(train), hook_name, name
        self.batch_size = batch_size
        X = hook_activations(model, self.train.examples, hook_name, batch_size=batch_size).double()
        if not 2 <= n_clusters <= len(X):
            raise ValueError(f"n_clusters must be between 2 and the number of examples ({len(X)}), got {n_clusters}")
        fit = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(X.numpy())
        self.centroids = torch.as_tensor(fit.cluster_centers_, dtype=torch.float64)
        labels = torch.as_tensor(fit.labels_)
        self.scale = max(float(((X - self.centroids[labels]) ** 2).sum(1).mean()), 1e-12)
        directions = self.centroids - X.mean(0)
        self.directions = directions / torch.linalg.vector_norm(directions, dim=1, keepdim=True).clamp(min=1e-300)
        self._train_coefficients = self._coefficients_of(X)

    def _coefficients_of(self, X: Float[Tensor, "n d"]) -> Float[Tensor, "n r"]:
        return torch.exp(-torch.cdist(X.double(), self.centroids).square() / (2 * self.scale))

    @property
    def n_components(self) -> int:
        return len(self.centroids)

    @property
    def train_coefficients(self) -> Float[Tensor, "n r"]:
        return self._train_coefficients

    def coefficients(self, examples: LabeledExamples | Examples) -> Float[Tensor, "n r"]:
        X = hook_activations(self.model, as_labeled(examples).examples, self.hook_name, batch_size=self.batch_size)
        return self._coefficients_of(X)

    def top_examples(self, j: int, k: int = 20) -> Tensor:
        return top_of(self._train_coefficients[:, j], k)

    def intervention(self, j: int, magnitude: float, sign: int = 1) -> HookIntervention:
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        u = self.directions[j]

        def project(x: Tensor, hook) -> Tensor:
            unit = u.to(device=x.device, dtype=x.dtype).reshape(x.shape[2:])
            along = (x * unit).flatten(2).sum(-1)[..., None].reshape(*x.shape[:2], *[1] * (x.dim() - 2))
            return x - (sign * magnitude) * along * unit

        return HookIntervention(self.model, [(self.hook_name, project)])

    def magnitude_bounds(self, j: int) -> tuple[float, float]:
        return 0.25, 100.0  # 1 removes it; beyond, it is reversed (sign +1) or amplified (sign -1)

    def intervention_settings(self, j: int) -> dict[str, float | None]:
        return {}

    def figures(self) -> dict[str, float]:
        return {}

    def describe(self) -> str:
        return (f"activation k-means: {self.n_components} clusters of {self.hook_name} at the target position, "
                f"fitted to {len(self.train)} examples")
