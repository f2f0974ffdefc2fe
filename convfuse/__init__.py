"""convfuse: merge runs of linear convolutions into one exactly equivalent convolution."""

from __future__ import annotations

from .algebra import ChannelAffine, Cost, add, compose, compose_chain, concat, then_affine
from .decline import Decline, Reason
from .errors import ConvfuseError
from .frontends.onnx_graph import fuse_onnx
from .frontends.torch_fx import fuse, fuse_with_report
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
    "fuse",
    "fuse_onnx",
    "fuse_with_report",
    "then_affine",
    "verify",
]
