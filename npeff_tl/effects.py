"""What a component's intervention does: on its top held-out examples, at the magnitude and sign that
selectivity calibrated, which tokens gain and lose log-probability on average and each example's top prediction
before and after (``logit_effects``), and where in the forward pass the effect travels (``component_traces``).
The report's "logit effects" and "circuit" panels read these.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from .dictionaries import Dictionary, top_of
from .examples import LabeledExamples
from .interventions import target_log_probs
from .evaluation.selectivity import SelectivityResult
from .tracing import Trace, trace


@dataclass(frozen=True)
class LogitEffects:
    """One component's effect on its top held-out examples (token ids; log-probability changes in nats, averaged
    over those examples; probabilities of the top predictions)."""

    component: int
    sign: int
    magnitude: float
    examples: list[int]  # held-out indices, largest coefficient first
    promoted: list[tuple[int, float]]  # (token id, mean change of its log-probability)
    suppressed: list[tuple[int, float]]
    before: list[tuple[int, float]]  # per example: (top token, its probability) without the intervention
    after: list[tuple[int, float]]  # ... and with it

    def to_dict(self) -> dict:
        return asdict(self)


def logit_effects(
    dictionary: Dictionary,
    heldout: LabeledExamples,
    result: SelectivityResult,
    coefficients: Float[Tensor, "n r"],
    *,
    n_examples: int = 8,
    k: int = 5,
) -> list[LogitEffects]:
    """Per component measured in ``result`` (at its first KL target, the sign with the larger selectivity), the
    effects of its intervention on its ``n_examples`` top held-out examples: the ``k`` tokens whose
    log-probability rises most and falls most on average, and the top prediction before and after."""
    out = []
    for j, sign, magnitude, top in measured_interventions(dictionary, result, coefficients, n_examples):
        examples = heldout.examples.subset(top)
        before = target_log_probs(dictionary.model, examples)
        with dictionary.intervention(j, magnitude, sign):
            after = target_log_probs(dictionary.model, examples)
        delta = torch.where(torch.isfinite(after - before), after - before, 0.0).mean(0)
        out.append(LogitEffects(
            component=j, sign=sign, magnitude=float(magnitude), examples=top.tolist(),
            promoted=_pairs(delta.topk(k)), suppressed=_pairs((-delta).topk(k), negate=True),
            before=_pairs(before.max(-1), exp=True), after=_pairs(after.max(-1), exp=True)))
    return out


def component_traces(
    dictionary: Dictionary,
    heldout: LabeledExamples,
    result: SelectivityResult,
    coefficients: Float[Tensor, "n r"],
    *,
    n_examples: int = 8,
    method: str = "atp*",
    progress: bool = False,
) -> dict[int, Trace]:
    """Per component measured in ``result``, the trace (``npeff_tl.trace``) of its intervention, at the magnitude
    and sign ``logit_effects`` uses, on its ``n_examples`` top held-out examples."""
    return {j: trace(dictionary.model, dictionary.intervention(j, magnitude, sign), heldout.examples.subset(top),
                     method=method, progress=progress)
            for j, sign, magnitude, top in measured_interventions(dictionary, result, coefficients, n_examples)}


def measured_interventions(dictionary: Dictionary, result: SelectivityResult, coefficients: Float[Tensor, "n r"],
                           n_examples: int):
    """(component, sign, magnitude, top held-out examples) per component measured in ``result``: at its first KL
    target, the sign with the larger selectivity and the magnitude calibrated for it."""
    first = result.settings["kl_targets"][0]
    W = torch.as_tensor(coefficients).double().cpu()
    for record in result.records:
        if record["method"] != dictionary.name or record["kl_target"] != first or record.get("sign") is None:
            continue
        j, sign = record["component"], record["sign"]
        magnitude = record["magnitude_plus" if sign == 1 else "magnitude_minus"]
        top = top_of(W[:, j], n_examples)
        if magnitude is not None and len(top) > 0:
            yield j, sign, float(magnitude), top


def _pairs(top, negate: bool = False, exp: bool = False) -> list[tuple[int, float]]:
    """(index, value) pairs of a ``topk`` / ``max`` result: values negated back, or exponentiated to probabilities."""
    values = (-top.values if negate else top.values).tolist()
    values = [math.exp(v) if exp else v for v in values]
    return [(int(i), float(v)) for i, v in zip(top.indices.tolist(), values)]
