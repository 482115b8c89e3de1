"""Model adapters: the only place that knows how a model class stores parameters and computes logits.

The core asks an adapter for (a) the model's parameters under TransformerLens names and (b) the logits at
chosen token positions, optionally with some parameters replaced (for ``torch.func`` transforms). Each model
class has its adapter: ``HookedTransformerAdapter`` (``hooked.py``) and ``BridgeAdapter`` for TransformerLens's
``TransformerBridge`` over Hugging Face models (``bridge.py``); ``as_adapter`` picks it.
"""

from .base import Capture, LinearMap, ModelAdapter, as_adapter
from .bridge import BridgeAdapter
from .hooked import HookedTransformerAdapter

__all__ = ["Capture", "LinearMap", "ModelAdapter", "as_adapter", "BridgeAdapter", "HookedTransformerAdapter"]
