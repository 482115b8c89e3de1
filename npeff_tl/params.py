"""ParamSpace: which parameters a PEF covers, and the map between flat indices and TL parameter names.

Every PEF, component and perturbation is a vector over a ParamSpace: the selected parameters, flattened in
the model's own parameter order and concatenated. The space remembers each parameter's TransformerLens name
and shape, so any flat vector can be read back as named tensors in TL layouts (per head, per neuron).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from .adapters import ModelAdapter, as_adapter


def _summarize_names(names: Sequence[str]) -> str:
    """Parameter names with layer indices collapsed, e.g. ``blocks.*.attn.W_Q`` for every layer."""
    collapsed = dict.fromkeys(re.sub(r"^blocks\.\d+\.", "blocks.*.", name) for name in names)
    return ", ".join(collapsed)


class ParamSpace:
    """An ordered selection of model parameters, flattened into one vector of length ``size``.

    Select by glob patterns over TransformerLens parameter names (``fnmatch`` syntax)::

        ParamSpace(model, include=["blocks.*.mlp.W_*", "blocks.1.attn.W_[QKV]"], exclude=["*.b_*"])

    The flat order is the model's parameter order, whatever the order of the patterns.
    """

    def __init__(
        self,
        model: nn.Module | ModelAdapter,
        include: str | Sequence[str] = "*",
        exclude: str | Sequence[str] = (),
    ):
        include = [include] if isinstance(include, str) else list(include)
        exclude = [exclude] if isinstance(exclude, str) else list(exclude)
        params = as_adapter(model).named_parameters()
        names = list(params)
        for pattern in include + exclude:
            if not fnmatch.filter(names, pattern):
                raise ValueError(
                    f"parameter pattern {pattern!r} matches no parameter of this model. "
                    f"Available (layer indices collapsed): {_summarize_names(names)}"
                )
        chosen = [
            name
            for name in names
            if any(fnmatch.fnmatchcase(name, p) for p in include)
            and not any(fnmatch.fnmatchcase(name, p) for p in exclude)
        ]
        if not chosen:
            raise ValueError(
                f"include={include} minus exclude={exclude} selects no parameter; "
                f"available (layer indices collapsed): {_summarize_names(names)}"
            )
        self._setup({name: tuple(params[name].shape) for name in chosen})

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]]) -> ParamSpace:
        """A space from names and shapes alone (for loading results without the model, or synthetic data)."""
        if not shapes:
            raise ValueError("a ParamSpace needs at least one parameter")
        space = cls.__new__(cls)
        space._setup({name: tuple(int(s) for s in shape) for name, shape in shapes.items()})
        return space

    @classmethod
    def flat(cls, size: int, name: str = "flat") -> ParamSpace:
        """A one-tensor space of ``size`` anonymous parameters (for synthetic PEFs)."""
        return cls.from_shapes({name: (size,)})

    def _setup(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes: dict[str, tuple[int, ...]] = shapes
        self.names: list[str] = list(shapes)
        sizes = [math.prod(shape) for shape in shapes.values()]
        self._starts = torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0)
        self.offsets: dict[str, tuple[int, int]] = {
            name: (int(start), int(start) + size) for name, start, size in zip(self.names, self._starts, sizes)
        }
        self.size: int = sum(sizes)

    # ----------------------------------------------------------------------------------------- identity
    def to_dict(self) -> dict[str, Any]:
        return {"names": self.names, "shapes": [list(self.shapes[n]) for n in self.names]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParamSpace:
        return cls.from_shapes(dict(zip(data["names"], data["shapes"])))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParamSpace) and self.shapes == other.shapes and self.names == other.names

    def __hash__(self) -> int:
        return hash(tuple(self.shapes.items()))

    def __repr__(self) -> str:
        return f"ParamSpace(size={self.size}, params=[{_summarize_names(self.names)}])"

    def check_model(self, model: nn.Module | ModelAdapter) -> dict[str, Tensor]:
        """The model's parameters of this space, after checking they exist with the recorded shapes."""
        params = as_adapter(model).named_parameters()
        for name, shape in self.shapes.items():
            if name not in params:
                raise ValueError(f"the model has no parameter {name!r} of this ParamSpace; is it the same model?")
            if tuple(params[name].shape) != shape:
                raise ValueError(
                    f"parameter {name!r} has shape {tuple(params[name].shape)} in the model but {shape} in "
                    "this ParamSpace; is it the same model?"
                )
        return {name: params[name] for name in self.names}

    # ------------------------------------------------------------------------------- flat <-> named
    def flat_values(self, model: nn.Module | ModelAdapter) -> Float[Tensor, " size"]:
        """The model's current values of this space as one flat vector (a copy)."""
        return torch.cat([p.detach().reshape(-1) for p in self.check_model(model).values()])

    def to_named(self, flat: Float[Tensor, "*batch size"]) -> dict[str, Tensor]:
        """Views of a flat vector (or a batch of them) as named tensors in TL layouts."""
        if flat.shape[-1] != self.size:
            raise ValueError(f"expected a last dimension of {self.size} (this space's size), got {flat.shape[-1]}")
        batch = flat.shape[:-1]
        return {
            name: flat[..., start:stop].reshape(*batch, *self.shapes[name])
            for name, (start, stop) in self.offsets.items()
        }

    def to_flat(self, named: Mapping[str, Tensor]) -> Float[Tensor, " size"]:
        """Concatenate named tensors (TL layouts) into one flat vector of this space."""
        missing = [n for n in self.names if n not in named]
        extra = [n for n in named if n not in self.shapes]
        if missing or extra:
            raise ValueError(f"named tensors do not match this space: missing {missing}, unexpected {extra}")
        for name in self.names:
            if tuple(named[name].shape) != self.shapes[name]:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(named[name].shape)}, expected {self.shapes[name]}"
                )
        return torch.cat([named[name].reshape(-1) for name in self.names])

    def scatter(
        self, indices: Int[Tensor, " nnz"], values: Float[Tensor, " nnz"], accumulate: bool = False
    ) -> Float[Tensor, " size"]:
        """A dense flat vector with ``values`` at ``indices`` and zeros elsewhere."""
        self._check_indices(indices)
        out = torch.zeros(self.size, dtype=values.dtype, device=values.device)
        return out.index_put_((indices.long(),), values, accumulate=accumulate)

    # ----------------------------------------------------------------------- flat index <-> (name, index)
    def param_ids(self, flat: Int[Tensor, " m"]) -> Int[Tensor, " m"]:
        """For each flat index, the position of its parameter in ``names``."""
        self._check_indices(flat)
        return torch.searchsorted(self._starts.to(flat.device), flat.long(), right=True) - 1

    def locate(self, flat: int | Int[Tensor, " m"]) -> list[tuple[str, tuple[int, ...]]]:
        """(parameter name, multi-index in TL layout) of each flat index."""
        flat_t = torch.as_tensor(flat, dtype=torch.long).reshape(-1).cpu()
        located = []
        for index, pid in zip(flat_t.tolist(), self.param_ids(flat_t).tolist()):
            name = self.names[pid]
            local = index - self.offsets[name][0]
            located.append((name, tuple(int(i) for i in torch.unravel_index(torch.tensor(local), self.shapes[name]))))
        return located

    def index_of(self, name: str, index: Sequence[int]) -> int:
        """The flat index of element ``index`` of parameter ``name``."""
        if name not in self.shapes:
            raise KeyError(f"{name!r} is not in this ParamSpace; it holds: {_summarize_names(self.names)}")
        shape = self.shapes[name]
        if len(index) != len(shape) or any(not 0 <= i < s for i, s in zip(index, shape)):
            raise IndexError(f"index {tuple(index)} is out of range for {name!r} of shape {shape}")
        local = 0
        for i, s in zip(index, shape):
            local = local * s + int(i)
        return self.offsets[name][0] + local

    def _check_indices(self, flat: Tensor) -> None:
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.size):
            raise IndexError(f"flat indices must lie in [0, {self.size}) for this space")
