"""Conversions between torch layers and the shared descriptions (ConvSpec, ChannelAffine).

Plumbing only: reading attributes and writing modules. The math lives in ``convfuse.algebra``.
This is the torch edge of the numpy algebra: a spec holds numpy views of a layer's CPU weights
(no copy), and a written module gets the model's dtype and device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from ...algebra import ChannelAffine
from ...algebra_linear import as_matrix
from ...decline import Decline, Reason
from ...provenance import Provenance
from ...spec import ConvSpec, as_array, same_pads

__all__ = [
    "CONV_TYPES",
    "BATCHNORM_TYPES",
    "spec_from_conv",
    "conv_from_spec",
    "linear_from_spec",
    "affine_from_batchnorm",
    "to_tensor",
    "affine_tensors",
    "mark_provenance",
    "layer_types",
    "PROVENANCE_ATTR",
]

#: The attribute of a merged module holding its :class:`~convfuse.provenance.Provenance`.
PROVENANCE_ATTR = "convfuse_provenance"

_M = TypeVar("_M", bound=nn.Module)

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_PAD_TYPES = {
    "zeros": (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),
    "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
    "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
    "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
}


def spec_from_conv(conv: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> ConvSpec:
    """Describe a torch conv; ``padding='same'`` becomes its exact (possibly asymmetric) pads."""
    n = conv.weight.dim() - 2
    if conv.padding == "same":
        pads = same_pads(conv.kernel_size, conv.dilation, upper=True)
    elif conv.padding == "valid":
        pads = ((0, 0),) * n
    else:
        pads = tuple((int(p), int(p)) for p in conv.padding)
    return ConvSpec(
        weight=as_array(conv.weight),
        bias=None if conv.bias is None else as_array(conv.bias),
        stride=tuple(conv.stride),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        pads=pads,
        padding_mode=conv.padding_mode,
    )


def to_tensor(array: np.ndarray, dtype: torch.dtype | None = None, device: Any = None) -> torch.Tensor:
    """A numpy array as a torch tensor: a view when dtype and device already match, else one copy."""
    if not array.flags.writeable:  # torch refuses to view read-only memory
        array = array.copy()
    return torch.from_numpy(array).to(device=device, dtype=dtype)


def affine_tensors(affine: ChannelAffine, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-channel affine's scale and shift as tensors of ``like``'s dtype and device."""
    return (
        to_tensor(affine.scale, like.dtype, like.device),
        to_tensor(affine.shift, like.dtype, like.device),
    )


def conv_from_spec(spec: ConvSpec, dtype: torch.dtype | None = None, device: Any = None) -> nn.Module:
    """A torch module computing ``spec``: a ConvNd, or ``Sequential(pad, ConvNd)`` when the
    padding is asymmetric (torch convs pad symmetrically). Weights are copied, never shared.
    ``dtype`` and ``device`` are the model's (default: the spec's own dtype, on the CPU)."""
    weight = to_tensor(spec.weight, dtype, device)
    cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spec.ndim - 1]
    symmetric = all(b == e for b, e in spec.pads)
    # torch types each ConvNd's geometry as a tuple of its own length (``_size_2_t``) and the mode
    # as a Literal; a spec's are ``tuple[int, ...]`` of length ``ndim`` and a checked ``str``.
    geometry: dict[str, Any] = {
        "kernel_size": spec.kernel_size,
        "stride": spec.stride,
        "padding": tuple(b for b, _ in spec.pads) if symmetric else 0,
        "dilation": spec.dilation,
        "padding_mode": spec.padding_mode if symmetric else "zeros",
    }
    conv = cls(
        spec.in_channels,
        spec.out_channels,
        groups=spec.groups,
        bias=spec.bias is not None,
        device=weight.device,
        dtype=weight.dtype,
        **geometry,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if spec.bias is not None and conv.bias is not None:
            conv.bias.copy_(to_tensor(spec.bias, weight.dtype, weight.device))
    if symmetric:
        return conv
    flat = tuple(p for b, e in reversed(spec.pads) for p in (b, e))
    pad_cls = _PAD_TYPES[spec.padding_mode][spec.ndim - 1]
    pad = pad_cls(flat, 0.0) if spec.padding_mode == "zeros" else pad_cls(flat)
    return nn.Sequential(pad, conv)


def linear_from_spec(spec: ConvSpec, dtype: torch.dtype | None = None, device: Any = None) -> nn.Linear:
    """An ``nn.Linear`` computing a 1D pointwise spec on the last dim (weights copied), in the
    model's ``dtype`` and ``device`` (default: the spec's own dtype, on the CPU)."""
    matrix, vector = as_matrix(spec)
    weight = to_tensor(matrix, dtype, device)
    layer = nn.Linear(
        spec.in_channels, spec.out_channels, bias=vector is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if vector is not None:
            layer.bias.copy_(to_tensor(vector, weight.dtype, weight.device))
    return layer


def affine_from_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> ChannelAffine | Decline:
    """Inference BatchNorm as a per-channel affine, or why it is not one."""
    if bn.training:
        return Decline(
            Reason.TRAINING_MODE,
            f"{type(bn).__name__} is in training mode and normalises with batch statistics; "
            "call .eval() before fusing",
        )
    if bn.running_mean is None or bn.running_var is None:
        return Decline(
            Reason.TRAINING_MODE,
            f"{type(bn).__name__} has track_running_stats=False and always uses batch statistics",
        )
    return ChannelAffine.from_batchnorm(
        as_array(bn.running_mean),
        as_array(bn.running_var),
        None if bn.weight is None else as_array(bn.weight),
        None if bn.bias is None else as_array(bn.bias),
        bn.eps,
    )


def mark_provenance(
    module: _M, sources: Sequence[str], kind: str, op_types: Mapping[str, str] | None = None
) -> _M:
    """Record on a merged ``module`` the layers it replaces and the merge ``kind``: the
    :data:`PROVENANCE_ATTR` attribute and a line in ``repr(module)``. ``op_types`` gives the
    layer types the caller knows (a function call ``path:add_1`` is named ``add``). Returns
    ``module`` (picklable and deep-copyable as before: plain data, no closures)."""
    types = dict(op_types or {})

    def op_type(name: str) -> str:
        if name in types:
            return types[name]
        call = name.rpartition(":")[2] if ":" in name else ""
        return re.sub(r"_\d+$", "", call)

    provenance = Provenance(kind, tuple((name, op_type(name)) for name in sources))
    setattr(module, PROVENANCE_ATTR, provenance)
    module.extra_repr = _ReprWithProvenance(module)  # type: ignore[method-assign]
    return module


def layer_types(root: nn.Module, names: Sequence[str], prefix: str = "") -> dict[str, str]:
    """Class names of the layers ``names`` (paths under ``prefix``) that are submodules of ``root``."""
    found: dict[str, str] = {}
    for name in names:
        rel = name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name
        try:
            found[name] = type(root.get_submodule(rel)).__name__
        except AttributeError:  # a function call, or a layer outside ``root``
            continue
    return found


class _ReprWithProvenance:
    """``extra_repr`` of a merged module: its class's own, then where it came from."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self) -> str:
        own = type(self.module).extra_repr(self.module)
        p: Provenance = getattr(self.module, PROVENANCE_ATTR)
        layers = " + ".join(f"{name} ({op})" if op else name for name, op in p.sources)
        return ", ".join(x for x in (own, f"merged {p.kind.value} from {layers}") if x)
