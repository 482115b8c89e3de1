"""Baseline dictionaries speaking the same protocol as NPEFF: SAEs (through SAE-Lens), gradient clustering and
activation k-means. SAE-Lens is imported only when an SAE baseline is used."""

from .gradient_clustering import GradientClustering
from .kmeans import ActivationKMeans
from .sae import SAEDictionary, evaluate_sae, load_sae, train_sae

__all__ = ["ActivationKMeans", "GradientClustering", "SAEDictionary", "evaluate_sae", "load_sae", "train_sae"]
