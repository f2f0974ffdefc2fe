"""The zero response of a position-wise layer and the test a border fill must pass (issue 16).

Framework-neutral math behind reading a bias-filled border as a zero pad moved before the layer
(docs/border_fill.md section 2); the ONNX pass (:mod:`convfuse.frontends.onnx.border`) and the
torch pass (:mod:`convfuse.frontends.torch.fill`) find the pattern, this module says whether the
values fit.

A position-wise layer ``L(t)[c, p] = sum_i W[c, i] t[i, p] + z[c]`` (a 1x1 conv, stride 1,
unpadded; an inference BatchNorm) maps a zero-padded input to its output padded with ``z``:
``L(pad0(x)) == pad_z(L(x))``. A ring of stored values ``v`` equals ``z`` when ``v == z`` in the
stored dtype for a conv (the fill is its bias, copied), and within ``ULPS * eps(dtype) * slack``
of the float64 ``z`` for a BatchNorm, ``slack = |beta| + |mean * a|`` being the magnitude of the
terms whose roundings differ between the model's own computation of the shift and the runtime's
``BN(0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .decline import Decline

__all__ = ["ULPS", "BorderResult", "Moved", "batchnorm_zero_response", "conv_zero_response", "fill_matches"]

#: BN zero responses are matched within this many eps of the magnitude of their terms.
ULPS = 4.0


@dataclass(frozen=True)
class Moved:
    """A border-filled pad (and its writes) now a zero pad before ``layer``."""

    layer: str
    pad: str
    writes: tuple[str, ...]


@dataclass
class BorderResult:
    """What a border pass did: the pads it moved, the patterns it declined (with their nodes)."""

    moved: list[Moved] = field(default_factory=list)
    # the sources as Report.declined takes them
    declines: list[tuple[list[str] | tuple[str, ...], Decline]] = field(default_factory=list)


def conv_zero_response(bias: np.ndarray | None, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``z`` (float64) and its slack (zero: the bias is stored as is) for a conv with ``bias``."""
    z = np.zeros(channels) if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    return z, np.zeros(z.shape)


def batchnorm_zero_response(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """``z = beta - mean * gamma / sqrt(var + eps)`` in float64 and its slack ``|beta| + |mean * a|``."""
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in (gamma, beta, mean, var))
    a = gamma / np.sqrt(var + float(eps))
    return beta - mean * a, np.abs(beta) + np.abs(mean * a)


def fill_matches(values: np.ndarray, z: np.ndarray, slack: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Elementwise: whether stored ``values`` equal ``z`` as the border test allows.

    ``values`` are compared after a round trip through ``dtype`` (what the model stores); ``z`` and
    ``slack`` broadcast against ``values`` (per channel: shape ``[C, 1, ...]``)."""
    dtype = np.dtype(dtype)
    stored = np.asarray(values, dtype=np.float64).astype(dtype).astype(np.float64)
    target = np.asarray(z, dtype=np.float64).astype(dtype).astype(np.float64)
    tol = ULPS * float(np.finfo(dtype).eps) * np.asarray(slack, dtype=np.float64)
    return np.abs(stored - target) <= tol
