"""The only place the benchmarks call convfuse: one adapter per front end.

Everything else in :mod:`benchmarks` goes through :func:`fuse_torch` and :func:`fuse_onnx`, so a
change in the front ends' signatures is absorbed here. When a front end is not in this checkout the
adapter raises :class:`FrontEndUnavailable` naming what is missing.
"""

from __future__ import annotations

from typing import Any

import onnx
from torch import nn

import convfuse

__all__ = ["DEFAULT_POLICY", "FrontEndUnavailable", "fuse_onnx", "fuse_torch"]

#: The policy both front ends use by default (DESIGN.md section 3).
DEFAULT_POLICY = "flops"


class FrontEndUnavailable(NotImplementedError):
    """A convfuse front end the benchmark needs is not present in the installed convfuse."""


def _entry(name: str, what: str) -> Any:
    fn = getattr(convfuse, name, None)
    if fn is None:
        raise FrontEndUnavailable(
            f"convfuse.{name} ({what}) is not in this convfuse checkout "
            f"({convfuse.__file__}); merge the front end before running these benchmarks"
        )
    return fn


def fuse_torch(module: nn.Module, policy: str = DEFAULT_POLICY) -> nn.Module:
    """``convfuse.fuse(module, policy=...)``: a fused copy of an eval-mode module."""
    return _entry("fuse", "torch front end")(module, policy=policy)


def fuse_onnx(model: onnx.ModelProto, policy: str = DEFAULT_POLICY) -> tuple[onnx.ModelProto, Any]:
    """``convfuse.fuse_onnx(model, policy=...)``: the fused ModelProto and the convfuse Report."""
    fused, report = _entry("fuse_onnx", "ONNX front end")(model, policy=policy)
    return fused, report
