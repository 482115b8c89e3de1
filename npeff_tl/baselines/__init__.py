"""Baseline dictionaries speaking the same protocol as NPEFF: SAEs (through SAE-Lens), gradient clustering and
activation k-means. SAE-Lens is imported only when an SAE baseline is used."""

from .gradient_clustering import GradientClustering
from .kmeans import ActivationKMeans

__all__ = ["ActivationKMeans", "GradientClustering"]
