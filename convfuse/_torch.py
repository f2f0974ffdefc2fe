"""Importing torch only where a torch API is used: the ONNX path never needs it.

``import convfuse`` and everything under ``convfuse merge/inspect/verify`` on ONNX files import
numpy, onnx and onnxruntime only. A torch API calls :func:`require_torch`, which raises one
:class:`~convfuse.errors.TorchMissingError` line when PyTorch is not installed.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

from .errors import TorchMissingError

__all__ = ["LazyTorch", "require_torch", "torch_loaded", "is_torch_tensor"]


def require_torch(what: str) -> ModuleType:
    """The ``torch`` module, or :class:`TorchMissingError` naming ``what`` needed it."""
    try:
        import torch
    except ImportError as exc:
        raise TorchMissingError(
            f"{what} needs PyTorch, which is not installed here ({exc}); install it with "
            "'pip install torch' (convfuse merge, inspect and verify on ONNX files work without it)"
        ) from None
    return torch


def torch_loaded() -> ModuleType | None:
    """``torch`` if something in this process imported it already, else ``None`` (imports nothing).

    An object can only be a torch tensor or module if torch was imported to make it.
    """
    return sys.modules.get("torch")


def is_torch_tensor(value: Any) -> bool:
    torch = torch_loaded()
    return torch is not None and isinstance(value, torch.Tensor)


class LazyTorch:
    """Stands for the ``torch`` module in a module whose torch code runs only on request: the
    first attribute read imports torch (or raises :class:`TorchMissingError` naming ``what``)."""

    def __init__(self, what: str) -> None:
        self._what = what

    def __getattr__(self, name: str) -> Any:
        return getattr(require_torch(self._what), name)
