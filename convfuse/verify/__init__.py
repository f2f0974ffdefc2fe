"""Prove that a fused model computes what its reference computes, on CPU and (when present) CUDA.

Both models run on the same inputs (generated from the declared input types and shapes,
deterministic from a seed, or given by the caller) with the same runtime settings, and every
output is judged by :func:`convfuse.compare.compare`:

    passed  <=>  max |candidate - reference| <= rtol * max |reference| + atol

``rtol`` defaults per dtype (:data:`convfuse.compare.DEFAULT_RTOL`), ``atol`` to 0; integer and
bool outputs match exactly. A failing image-shaped output is located as ``border`` (the
signature of a padding mistake), ``interior`` or ``everywhere``. For ONNX, :func:`attribute`
compares every tensor both graphs share by name and runs each diverging region alone on the
reference's values at its boundary, naming the regions (merges) that are wrong on their own.

The package, by job: :mod:`.result` (the typed answer, :class:`VerifyResult`), :mod:`.inputs`
(models, ports, input sets), :mod:`.input_plan` (the sizes symbolic dims get), :mod:`.onnx_run`
(:func:`verify_onnx`), :mod:`.attribution` (:func:`attribute`), :mod:`.torch_run`
(:func:`verify_modules`). ONNX Runtime sessions are :mod:`convfuse.runtime`'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, overload

import onnx

from .._torch import torch_loaded
from ..errors import ConvfuseError
from .attribution import attribute
from .inputs import Feeds, InputSpec, OnnxSource
from .onnx_run import verify_onnx
from .result import OutputCheck, Suspect, VerifyResult
from .torch_run import verify_modules

if TYPE_CHECKING:
    import torch

__all__ = [
    "Feeds",
    "InputSpec",
    "OnnxSource",
    "OutputCheck",
    "Suspect",
    "VerifyResult",
    "attribute",
    "verify",
    "verify_modules",
    "verify_onnx",
]


@overload
def verify(
    reference: OnnxSource,
    candidate: OnnxSource,
    *,
    device: str = ...,
    samples: int = ...,
    seed: int = ...,
    shapes: Mapping[str, Sequence[int]] | None = ...,
    inputs: Feeds | None = ...,
    rtol: float | None = ...,
    atol: float | None = ...,
    attribution: bool = ...,
) -> VerifyResult: ...


@overload
def verify(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = ...,
    input_shapes: Sequence[int] | Sequence[Sequence[int]] | None = ...,
    device: str = ...,
    samples: int = ...,
    seed: int = ...,
    rtol: float | None = ...,
    atol: float | None = ...,
) -> VerifyResult: ...


def verify(reference: object, candidate: object, **options: object) -> VerifyResult:
    """Compare ``candidate`` with ``reference``: two ONNX models (ModelProto or path) or two modules.

    ONNX models go to :func:`verify_onnx`, ``nn.Module`` pairs to :func:`verify_modules` (which
    need ``example_inputs`` or ``input_shapes``); see those for the options.
    """
    loaded = torch_loaded()  # a module exists only if torch was imported: never import it here
    if (
        loaded is not None
        and isinstance(reference, loaded.nn.Module)
        and isinstance(candidate, loaded.nn.Module)
    ):
        return verify_modules(reference, candidate, **options)  # type: ignore[arg-type]
    if isinstance(reference, (onnx.ModelProto, str, os.PathLike)) and isinstance(
        candidate, (onnx.ModelProto, str, os.PathLike)
    ):
        return verify_onnx(reference, candidate, **options)  # type: ignore[arg-type]
    raise ConvfuseError(
        "verify needs two ONNX models (paths or ModelProto) or two nn.Modules, got "
        f"{type(reference).__name__} and {type(candidate).__name__}"
    )
