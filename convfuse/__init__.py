"""convfuse: merge runs of linear convolutions into one exactly equivalent convolution.

``import convfuse`` imports numpy and onnx, never torch: the torch front end (:func:`fuse`,
:func:`fuse_with_report`) is imported on first use, and says in one line
(:class:`~convfuse.errors.TorchMissingError`) when PyTorch is not installed.
"""

from __future__ import annotations

from typing import Any

from .algebra import ChannelAffine, Cost, add, compose, compose_chain, concat, then_affine
from .decline import Decline, Reason
from .errors import ConvfuseError
from .frontends.onnx.graph import fuse_onnx
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

#: Exports that need torch, and the module that holds them.
_TORCH_EXPORTS = {"fuse": "frontends.torch.fx", "fuse_with_report": "frontends.torch.fx"}


def __getattr__(name: str) -> Any:
    module = _TORCH_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'convfuse' has no attribute {name!r}")
    from ._torch import require_torch

    require_torch(f"convfuse.{name}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
