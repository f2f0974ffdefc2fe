"""convfuse: merge runs of linear convolutions into one exactly equivalent convolution.

``import convfuse`` imports numpy and onnx, never torch: the torch front end (:func:`fuse`,
:func:`fuse_with_report`) is imported on first use, and says in one line
(:class:`~convfuse.errors.TorchMissingError`) when PyTorch is not installed.

The API: :func:`fuse` / :func:`fuse_with_report` (an ``nn.Module``), :func:`fuse_onnx` (an ONNX
model), :func:`merge_file` (an ONNX file: fuse, verify, write atomically; what ``convfuse merge``
runs), :func:`verify` (two ONNX models or two modules), the algebra (:func:`compose`, :func:`add`,
...) on :class:`ConvSpec` values, and :class:`Decline` / :class:`Reason` for what is not merged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, overload

from .algebra import ChannelAffine, Cost, add, compose, compose_chain, concat, then_affine
from .decline import Decline, Reason
from .errors import ConvfuseError, ExitCode
from .files import MergeResult, Verdict, Verification, merge_file
from .frontends.onnx.api import fuse_onnx
from .report import Report
from .spec import ConvSpec
from .verify import VerifyResult, verify

if TYPE_CHECKING:
    from torch import nn

    from .frontends.torch.api import fuse_with_report
    from .policy import Policy
    from .timing import Timer

    @overload
    def fuse(
        module: nn.Module,
        policy: Policy | str = ...,
        return_report: Literal[False] = ...,
        example_inputs: Any = ...,
        *,
        device: str = ...,
        latency_budget: float = ...,
        timer: Timer | None = ...,
        check: bool = ...,
    ) -> nn.Module: ...

    @overload
    def fuse(
        module: nn.Module,
        policy: Policy | str,
        return_report: Literal[True],
        example_inputs: Any = ...,
        *,
        device: str = ...,
        latency_budget: float = ...,
        timer: Timer | None = ...,
        check: bool = ...,
    ) -> tuple[nn.Module, Report]: ...

    @overload
    def fuse(
        module: nn.Module,
        policy: Policy | str = ...,
        *,
        return_report: Literal[True],
        example_inputs: Any = ...,
        device: str = ...,
        latency_budget: float = ...,
        timer: Timer | None = ...,
        check: bool = ...,
    ) -> tuple[nn.Module, Report]: ...

    def fuse(*args: Any, **kwargs: Any) -> nn.Module | tuple[nn.Module, Report]: ...


__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ChannelAffine",
    "ConvSpec",
    "ConvfuseError",
    "Cost",
    "Decline",
    "ExitCode",
    "MergeResult",
    "Reason",
    "Report",
    "Verdict",
    "Verification",
    "VerifyResult",
    "add",
    "compose",
    "compose_chain",
    "concat",
    "fuse",
    "fuse_onnx",
    "fuse_with_report",
    "merge_file",
    "then_affine",
    "verify",
]

#: Exports that need torch, and the module that holds them.
_TORCH_EXPORTS = {"fuse": "frontends.torch.api", "fuse_with_report": "frontends.torch.api"}


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
