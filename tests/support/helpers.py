"""Helpers shared by the test modules."""

from __future__ import annotations

import torch

__all__ = ["rel_err"]


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Max absolute error over the reference's max magnitude (1 when the output is all zero)."""
    assert ref.shape == out.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if ref.numel() == 0:
        return 0.0
    ref, out = ref.detach(), out.detach()
    scale = float(ref.abs().max())
    return float((ref - out).abs().max()) / (scale if scale > 0 else 1.0)
