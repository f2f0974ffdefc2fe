"""convfuse: merge runs of linear convolutions into one exactly equivalent convolution."""

from __future__ import annotations

from .algebra import ChannelAffine, Cost, add, compose, compose_chain, concat, then_affine
from .decline import Decline, Reason
from .errors import ConvfuseError
from .spec import ConvSpec
from .verify import verify

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ChannelAffine",
    "ConvSpec",
    "ConvfuseError",
    "Cost",
    "Decline",
    "Reason",
    "add",
    "compose",
    "compose_chain",
    "concat",
    "then_affine",
    "verify",
]
