"""The torch module of a case-2 merge's border correction (issue 14): ``conv(x) + ring``.

:class:`BorderConv` wraps the merged conv and adds the constant ring of
:class:`~convfuse.border_map.BorderMap`. A torch model runs at any input size, so the ring is
always available at run time: per ring term a one-channel conv of ``ones[1, 1, *nA]`` (``nA``
the term's first conv's output size on ``x``, the geometry of
:func:`~convfuse.border.ring_conv`), summed. Where the planner chose the ``dense`` form (the
input size was known), the ring for that size is also kept and added directly when ``x`` has
that size. The constants of the form the planner chose are frozen parameters
(``requires_grad=False``: counted with the model's parameters, as the planner counts them; the
fallback next to a dense ring is buffers), in the model's dtype and on its device;
``state_dict`` holds the conv's, ``ring`` (dense form only) and ``ring_weight<k>``/``ring_bias<k>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...border import ring_conv
from ...border_map import Correction
from ...decline import Decline
from .layers import to_tensor

__all__ = ["BorderConv", "border_conv"]

_CONV = (F.conv1d, F.conv2d, F.conv3d)


class BorderConv(nn.Module):
    """``conv(x) + ring(x.shape[2:])``: a merged conv and its constant border correction."""

    def __init__(
        self,
        conv: nn.Module,
        terms: list[dict[str, Any]],
        ring: torch.Tensor | None,
        size: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.conv = conv
        self._geometry = [{k: v for k, v in t.items() if k not in ("weight", "bias")} for t in terms]
        for k, t in enumerate(terms):  # the form the planner costed is held as frozen parameters
            for name in ("weight", "bias"):
                if ring is None:
                    self.register_parameter(f"ring_{name}{k}", nn.Parameter(t[name], requires_grad=False))
                else:  # the fallback for other sizes, next to a dense ring
                    self.register_buffer(f"ring_{name}{k}", t[name])
        self.size = size  # the input size ``ring`` is for (None: no dense ring)
        if ring is not None:
            self.register_parameter("ring", nn.Parameter(ring, requires_grad=False))

    def extra_repr(self) -> str:
        shape = tuple(self.ring.shape[1:]) if self.size is not None else ()  # type: ignore[index]
        form = f"dense {shape} for input {self.size}, " if self.size is not None else ""
        return f"ring: {form}{len(self._geometry)} ones-map conv(s) at other sizes"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.size is not None and tuple(x.shape[2:]) == self.size:
            return y + self.ring
        return y + self.ring_at(tuple(int(d) for d in x.shape[2:]), y)

    def ring_at(self, spatial: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """The ring ``[1, Co, *out]`` for input size ``spatial``, built from ones maps."""
        total = None
        for k, g in enumerate(self._geometry):
            n_a = [
                (n + pb + pe - e) // s + 1
                for n, (pb, pe), e, s in zip(spatial, g["a_pads"], g["a_extent"], g["a_stride"])
            ]
            ones = like.new_ones((1, 1, *n_a))
            flat = [p for b, e in reversed(g["pads"]) for p in (b, e)]
            weight = getattr(self, f"ring_weight{k}")
            part = _CONV[len(n_a) - 1](
                F.pad(ones, flat), weight, getattr(self, f"ring_bias{k}"), g["stride"], 0, g["dilation"]
            )
            total = part if total is None else total + part
        assert total is not None
        return total


def border_conv(conv: nn.Module, ring: Correction, dtype: torch.dtype, device: Any) -> BorderConv:
    """The merged ``conv`` with ``ring`` added, its constants in ``dtype`` on ``device``."""
    terms = []
    for t in ring.map.terms:
        rc = ring_conv(t.merge)  # on the first conv's grid: exists for every case-2 merge
        assert not isinstance(rc, Decline), rc
        core = t.core()
        a = t.merge.first
        terms.append(
            {
                "weight": to_tensor(core.reshape(core.shape[0], 1, *core.shape[1:]), dtype, device),
                "bias": to_tensor(-t.interior(), dtype, device),
                "stride": rc.stride,
                "dilation": rc.dilation,
                "pads": rc.pads,
                "a_pads": a.pads,
                "a_extent": a.extent,
                "a_stride": a.stride,
            }
        )
    dense = None
    if ring.form == "dense":
        assert ring.spatial is not None
        dense = to_tensor(np.ascontiguousarray(ring.map.ring(ring.spatial)[None]), dtype, device)
    return BorderConv(conv, terms, dense, ring.spatial if dense is not None else None)
