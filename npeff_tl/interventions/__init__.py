"""Interventions and what they are measured with: parameter perturbations and hook interventions that restore
the model bit for bit (``perturbation``), the NPEFF components' directions (``directions``), predictions and KL
under an intervention (``probes``), and the magnitude search (``calibration``)."""

from .calibration import calibrate_magnitude
from .directions import dnpeff_direction, lrm_direction, sign_pattern
from .perturbation import HookIntervention, ParameterDirection, ParameterPerturbation, perturb, random_direction
from .probes import KLProbe, accuracy, kl_divergence, target_log_probs

__all__ = [
    "calibrate_magnitude", "dnpeff_direction", "lrm_direction", "sign_pattern", "HookIntervention",
    "ParameterDirection", "ParameterPerturbation", "perturb", "random_direction", "KLProbe", "accuracy",
    "kl_divergence", "target_log_probs",
]
