"""The adapter for TransformerLens's ``TransformerBridge``: Hugging Face models of many architectures (GPT-2,
GPT-NeoX / Pythia, Llama, ...) behind TransformerLens names and hooks.

A bridge names its parts the same way for every architecture (``blocks.{l}.attn.q/k/v/o``,
``blocks.{l}.mlp.gate/in/out``, ``blocks.{l}.ln1/ln2``, ``embed``, ``pos_embed``, ``ln_final``, ``unembed``), each
wrapping the Hugging Face module that does the work. This adapter shows the weights of those parts under
HookedTransformer's names and layouts (``blocks.0.attn.W_Q`` [n_heads, d_model, d_head], ``blocks.0.mlp.W_in``
[d_model, d_mlp], ...) as views of the Hugging Face parameters, so steps added to them change the model itself
and the model's own state is what gets restored. Fused parameters that the bridge split (GPT-2's ``c_attn``,
GPT-NeoX's ``query_key_value``) appear as their parts; the fused originals, which the bridge's forward pass no
longer uses, and weights tied to another (GPT-2's unembedding is its embedding) appear once. Parameters of no
standard part (e.g. extra norms of some architectures) are listed in ``config_summary()["unmapped"]``.

Gradients are taken on the real parameters: the linear parts' ``hook_in`` / ``hook_out`` carry x and y of
y = x @ W in TransformerLens layout (heads split), which is what the hook trick needs; the other parameters go
through ``torch.func`` with the views undone. A bridge in compatibility mode (folded LayerNorms, centred
weights) computes with another parametrisation, so another Fisher: the mode is part of ``config_summary()``,
which every result records and compatibility checks compare.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .base import Capture, LinearMap, ModelAdapter, select_output


def is_bridge(model: nn.Module) -> bool:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:
        return False
    return isinstance(model, TransformerBridge)


@dataclass(frozen=True)
class BridgeParameter:
    """One parameter under its TransformerLens name: the model's own parameter and how the TL layout is a view
    of it (``view``) and back (``unview``, out of place, for ``torch.func``)."""

    name: str
    hf_name: str
    module_names: tuple[str, ...]  # one name per module that holds it (several if tied), for functional_call
    parameter: nn.Parameter
    view: Callable[[Tensor], Tensor]
    unview: Callable[[Tensor], Tensor]
    linear_map: LinearMap | None = None


def _identity(t: Tensor) -> Tensor:
    return t


def _hf_name(bridge_name: str) -> str:
    """A parameter's Hugging Face name: the bridge's own name without its wrapper segments."""
    return bridge_name.replace("._original_component", "")


def _weight_layouts(module: nn.Module | None) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] | None:
    """[d_in, d_out] from the module's weight and back: ``nn.Linear`` keeps [d_out, d_in]; GPT-2's ``Conv1D``
    already keeps [d_in, d_out]. None for any other module (its parameters stay unmapped)."""
    if isinstance(module, nn.Linear):
        return (lambda w: w.T), (lambda w: w.T)
    if type(module).__name__ == "Conv1D":
        return _identity, _identity
    return None


def _split_out(heads: int, to_in_out, from_in_out):
    """W [d_in, heads * d_head] -> [heads, d_in, d_head] (Q, K, V) and back."""
    return (lambda w: to_in_out(w).unflatten(1, (heads, -1)).permute(1, 0, 2),
            lambda t: from_in_out(t.permute(1, 0, 2).flatten(1)))


def _split_in(heads: int, to_in_out, from_in_out):
    """W [heads * d_head, d_out] -> [heads, d_head, d_out] (O) and back."""
    return (lambda w: to_in_out(w).unflatten(0, (heads, -1)), lambda t: from_in_out(t.flatten(0, 1)))


def _split_bias(heads: int):
    return (lambda b: b.unflatten(0, (heads, -1))), (lambda t: t.flatten(0, 1))


# HookedTransformer's order of a block's parameters, so that a parameter space means the same vector on both
BLOCK_ORDER = ("ln1.w", "ln1.b", "ln2.w", "ln2.b", "attn.W_Q", "attn.W_O", "attn.b_Q", "attn.b_O", "attn.W_K",
               "attn.W_V", "attn.b_K", "attn.b_V", "mlp.W_in", "mlp.W_gate", "mlp.b_in", "mlp.b_gate", "mlp.W_out",
               "mlp.b_out")
OUTSIDE_BLOCKS = (("embed.W_E", "pos_embed.W_pos"), ("ln_final.w", "ln_final.b", "unembed.W_U", "unembed.b_U"))


def _hooked_order(name: str) -> tuple[int, int, int]:
    if name.startswith("blocks."):
        _, layer, rest = name.split(".", 2)
        return 1, int(layer), BLOCK_ORDER.index(rest)
    before, after = OUTSIDE_BLOCKS
    return (0, 0, before.index(name)) if name in before else (2, 0, after.index(name))


# Each bridge's parameter map (and the parameters it was built for), so that the many adapters the library makes
# for one bridge (one per call) build it once. Weak keys: the maps hold parts of a bridge, never the bridge itself.
_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class BridgeAdapter(ModelAdapter):
    """Adapter for ``transformer_lens.model_bridge.TransformerBridge`` (transformer-lens 3.9 and 4.x)."""

    def __init__(self, model: nn.Module):
        self.model = model

    # ------------------------------------------------------------------------------ the parameter map
    @property
    def parameters_by_name(self) -> dict[str, BridgeParameter]:
        """Every mapped parameter by TL name, in HookedTransformer's order; built again when the bridge's
        parameters are other tensors than last time (e.g. compatibility mode unties the unembedding)."""
        current = tuple(map(id, self.model.parameters()))
        built_for, params = _MAPS.get(self.model, ((), {}))
        if current != built_for:
            params = self._map_parameters()
            _MAPS[self.model] = (current, params)
        return params

    def _map_parameters(self) -> dict[str, BridgeParameter]:
        bridge, cfg = self.model, self.model.cfg
        module_names: dict[int, tuple[str, ...]] = {}  # one name per module holding the parameter
        owners: set[tuple[int, int]] = set()
        for name, p in nn.Module.named_parameters(bridge, remove_duplicate=False):
            owner = (id(p), id(bridge.get_submodule(name.rpartition(".")[0])))
            if owner not in owners:  # the bridge registers some modules under two paths
                owners.add(owner)
                module_names[id(p)] = (*module_names.get(id(p), ()), name)
        hf_names = {id(p): _hf_name(name) for name, p in bridge.named_parameters()}
        n_heads = int(cfg.n_heads)
        n_kv = int(getattr(cfg, "n_key_value_heads", None) or n_heads)
        found: dict[str, BridgeParameter] = {}
        seen: set[int] = set()

        def add(name: str, parameter, view=_identity, unview=_identity, linear_map=None) -> None:
            if not isinstance(parameter, nn.Parameter) or id(parameter) in seen:  # tied weights appear once;
                return  # constants (a bridge's zero bias where the model has none) are not parameters
            seen.add(id(parameter))
            found[name] = BridgeParameter(name, hf_names.get(id(parameter), module_names[id(parameter)][0]),
                                          module_names[id(parameter)], parameter, view, unview, linear_map)

        def linear(prefix: str, part: nn.Module, weight: str, bias: str, heads: int = 0, heads_in: bool = False):
            """y = x @ W + b of a linear part; ``heads``: its output (``heads_in``: its input) splits into heads.
            A part this bridge does not have, or of an unknown kind, stays unmapped."""
            inner = getattr(part, "original_component", None)
            if (layouts := _weight_layouts(inner)) is None:
                return
            view, unview = layouts
            bias_view, bias_unview = _identity, _identity
            if heads and heads_in:
                view, unview = _split_in(heads, view, unview)
            elif heads:
                view, unview = _split_out(heads, view, unview)
                bias_view, bias_unview = _split_bias(heads)
            out = Capture(part.hook_out, select_output)  # the module's own output: heads side by side
            split = 0 if heads_in else heads
            add(f"{prefix}.{weight}", inner.weight, view, unview,
                LinearMap(out, Capture(part.hook_in, select_output), output_heads=split))
            add(f"{prefix}.{bias}", getattr(inner, "bias", None), bias_view, bias_unview,
                LinearMap(out, output_heads=split))

        def norm(prefix: str, part: nn.Module | None) -> None:
            inner = getattr(part, "original_component", None)
            if inner is not None:
                add(f"{prefix}.w", getattr(inner, "weight", None))
                add(f"{prefix}.b", getattr(inner, "bias", None))

        add("embed.W_E", bridge.embed.original_component.weight)
        if hasattr(bridge, "pos_embed"):
            add("pos_embed.W_pos", bridge.pos_embed.original_component.weight)
        for layer, block in enumerate(bridge.blocks):
            prefix = f"blocks.{layer}"
            norm(f"{prefix}.ln1", getattr(block, "ln1", None))
            attn = block.attn
            for letter, heads in (("Q", n_heads), ("K", n_kv), ("V", n_kv)):
                linear(f"{prefix}.attn", getattr(attn, letter.lower(), None), f"W_{letter}", f"b_{letter}", heads)
            linear(f"{prefix}.attn", getattr(attn, "o", None), "W_O", "b_O", n_heads, heads_in=True)
            norm(f"{prefix}.ln2", getattr(block, "ln2", None))
            mlp = getattr(block, "mlp", None)
            if mlp is not None:
                for part, weight, bias in (("gate", "W_gate", "b_gate"), ("in", "W_in", "b_in"),
                                           ("out", "W_out", "b_out")):
                    if part in mlp._modules:
                        linear(f"{prefix}.mlp", mlp._modules[part], weight, bias)
        norm("ln_final", getattr(bridge, "ln_final", None))
        linear("unembed", bridge.unembed, "W_U", "b_U")
        return dict(sorted(found.items(), key=lambda item: _hooked_order(item[0])))

    def unmapped(self) -> list[str]:
        """Hugging Face names of the parameters of no standard part (not selectable), leaving out the fused QKV
        originals that the bridge split and no longer uses."""
        mapped = {id(p.parameter) for p in self.parameters_by_name.values()}
        dead = {id(p) for block in self.model.blocks for p in self._fused_originals(block)}
        return [_hf_name(name) for name, p in self.model.named_parameters() if id(p) not in mapped | dead]

    @staticmethod
    def _fused_originals(block: nn.Module) -> list[nn.Parameter]:
        """Parameters of a fused QKV that the bridge split into q, k and v (its forward pass uses the parts)."""
        qkv = getattr(block.attn, "qkv", None)
        return list(qkv.parameters()) if qkv is not None and hasattr(block.attn, "q") else []

    # ------------------------------------------------------------------------------ ModelAdapter
    def named_parameters(self) -> dict[str, Tensor]:
        """Views of the model's parameters in TL layouts (detached: adding to them changes the model)."""
        return {name: p.view(p.parameter.detach()) for name, p in self.parameters_by_name.items()}

    def parameters_behind(self, names: list[str]) -> list[nn.Parameter]:
        params = self.parameters_by_name
        return list({id(params[n].parameter): params[n].parameter for n in names}.values())

    def linear_maps(self) -> dict[str, LinearMap]:
        return {name: p.linear_map for name, p in self.parameters_by_name.items() if p.linear_map is not None}

    def hooks(self, fwd_hooks: list[tuple[str, Callable]]):
        """``model.hooks`` with every hook behind one name filter: the bridge rebuilds its hook dict (with
        aliases) for each hook named, 15-30 ms a time on a 30-block model, and once for a filter. The hooks of one
        hook point run in the order given, each on the previous one's output, as TransformerLens runs them."""
        points = self.model.hook_dict
        unknown = [name for name, _ in fwd_hooks if name not in points]
        if unknown:
            raise ValueError(f"the bridge has no hooks named {unknown[:5]}")
        by_point: dict[int, list[Callable]] = {}
        for name, fn in fwd_hooks:
            by_point.setdefault(id(points[name]), []).append(fn)

        def run_all(activation, hook):
            for fn in by_point[id(hook)]:
                out = fn(activation, hook)
                activation = activation if out is None else out
            return activation

        return self.model.hooks(fwd_hooks=[(lambda name: id(points.get(name)) in by_point, run_all)])

    @property
    def vocab_size(self) -> int:
        return int(self.model.cfg.d_vocab)

    @property
    def ignores_padding(self) -> bool:
        return getattr(self.model.cfg, "attention_dir", "causal") != "bidirectional"

    def target_logits(
        self,
        tokens: Int[Tensor, "batch seq"],
        positions: Int[Tensor, "batch k"],
        params: Mapping[str, Tensor] | None = None,
    ) -> Float[Tensor, "batch k vocab"]:
        def targets_only(module, args, output):  # the unembedding then runs on the target positions alone
            return output.gather(1, positions[..., None].expand(*positions.shape, output.shape[-1]))

        # prepended, so that hooks recording the unembedding's input (the hook trick) see what it computes with
        handle = self.model.unembed.hook_in.register_forward_hook(targets_only, prepend=True)
        try:
            if params is None:
                return self.model(tokens)
            mapped = self.parameters_by_name
            unknown = [name for name in params if name not in mapped]
            if unknown:
                raise ValueError(f"the bridge has no parameters named {unknown[:5]}")
            replaced = {module_name: mapped[name].unview(value) for name, value in params.items()
                        for module_name in mapped[name].module_names}  # every name of a tied parameter
            return torch.func.functional_call(self.model, replaced, (tokens,), strict=False, tie_weights=False)
        finally:
            handle.remove()

    def config_summary(self) -> dict[str, Any]:
        cfg = self.model.cfg
        keys = ["model_name", "architecture", "n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head",
                "d_mlp", "d_vocab", "n_ctx", "act_fn", "normalization_type", "positional_embedding_type"]
        summary = {key: getattr(cfg, key, None) for key in keys}
        summary["class"] = type(self.model).__name__
        summary["dtype"] = str(self.dtype).removeprefix("torch.")
        summary["compatibility_mode"] = bool(getattr(self.model, "compatibility_mode", False))
        summary["hf_names"] = self.hf_names()  # each TL name's Hugging Face name, recorded with every result
        summary["unmapped"] = self.unmapped()
        return summary

    def hf_names(self) -> dict[str, str]:
        """Each TL name's Hugging Face name (the bridge's own name without its wrapper segments)."""
        return {name: p.hf_name for name, p in self.parameters_by_name.items()}
