"""The torch verifier: eval-mode copies of two modules run on the same inputs, every output judged.

torch is imported on the first call (never for ONNX); the caller's modules are never changed.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .._torch import LazyTorch
from ..errors import ConvfuseError, one_line
from .inputs import InputSpec, dims_text, generate_inputs, resolve_devices
from .result import OutputCheck, VerifyResult, judge

if TYPE_CHECKING:
    import torch
else:
    torch = LazyTorch("verifying torch modules")  # imported on the first torch API call, never for ONNX

__all__ = ["verify_modules"]

_NO_CUDA_TORCH = "torch.cuda.is_available() is False"


def _mode_dependent() -> tuple[type, ...]:
    """Layers that compute differently in training mode (batch statistics, random dropout)."""
    return (torch.nn.modules.batchnorm._NormBase, torch.nn.modules.dropout._DropoutNd)


def verify_modules(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_shapes: Sequence[int] | Sequence[Sequence[int]] | None = None,
    device: str = "cpu",
    samples: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyResult:
    """Run eval-mode copies of two modules on the same inputs with torch and compare every output.

    ``example_inputs`` (a tensor, or a tuple of positional tensors) is one sample; otherwise
    ``input_shapes`` (one shape, or one per positional input) gives ``samples`` standard normal
    sets from ``seed`` in the reference's parameter dtype. Outputs may be a tensor or nested
    tuples, lists and dicts of tensors; both modules must return the same structure.
    """
    if samples < 1:
        raise ConvfuseError(f"samples must be >= 1, got {samples}")
    devices, notes = resolve_devices(device, torch.cuda.is_available, _NO_CUDA_TORCH)
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(a, torch.Tensor) for a in args):
            raise ConvfuseError("example_inputs must be a tensor or a tuple of tensors")
        input_sets = [args]
    elif input_shapes is not None:
        dtype = _module_dtype(reference)
        specs = [InputSpec(f"input{i}", "float64", s) for i, s in enumerate(_shape_list(input_shapes))]
        input_sets = [
            tuple(torch.from_numpy(feed[s.name]).to(dtype) for s in specs)
            for feed in generate_inputs(specs, samples, seed)
        ]
    else:
        raise ConvfuseError("verifying modules needs example_inputs or input_shapes")

    checks: list[OutputCheck] = []
    for dev in devices:
        first = dev == devices[0]
        ref = _eval_copy(reference, dev, "reference", notes if first else [])
        cand = _eval_copy(candidate, dev, "candidate", notes if first else [])
        ref_runs = [_run_module(ref, args, dev, "reference") for args in input_sets]
        cand_runs = [_run_module(cand, args, dev, "candidate") for args in input_sets]
        if list(ref_runs[0]) != list(cand_runs[0]):
            raise ConvfuseError(
                f"reference and candidate return different outputs: {', '.join(ref_runs[0]) or '-'} "
                f"vs {', '.join(cand_runs[0]) or '-'}"
            )
        checks += [
            judge(
                name,
                dev,
                _torch_dtype(ref_runs[0][name]),
                _torch_dtype(cand_runs[0][name]),
                [_to_numpy(r[name]) for r in ref_runs],
                [_to_numpy(c[name]) for c in cand_runs],
                rtol,
                atol,
            )
            for name in ref_runs[0]
        ]
    return VerifyResult(
        kind="torch",
        reference=type(reference).__name__,
        candidate=type(candidate).__name__,
        checks=tuple(checks),
        devices=tuple(devices),
        samples=len(input_sets),
        seed=seed,
        inputs=tuple(
            InputSpec(f"input{i}", _torch_dtype(a), tuple(a.shape)) for i, a in enumerate(input_sets[0])
        ),
        notes=tuple(notes),
    )


def _shape_list(input_shapes: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """One shape, or one per input, as a list of tuples."""
    items = list(input_shapes)
    if items and all(isinstance(d, int) for d in items):
        return [tuple(int(d) for d in cast(Sequence[int], items))]
    return [tuple(int(d) for d in s) for s in cast(Sequence[Sequence[int]], items)]


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """Dtype of the module's first floating parameter or buffer (float32 when it has none)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _torch_dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")  # torch.float32 -> "float32", as numpy names it


def _eval_copy(module: torch.nn.Module, device: str, what: str, notes: list[str]) -> torch.nn.Module:
    """A deep copy in eval mode on ``device``: the caller's module is never changed."""
    if any(m.training and isinstance(m, _mode_dependent()) for m in module.modules()):
        notes.append(f"{what} was in training mode: compared a copy in eval mode")
    try:
        return copy.deepcopy(module).eval().to(device)
    except Exception as e:
        raise ConvfuseError(f"cannot copy the {what} module to {device}: {one_line(e)}") from None


def _run_module(
    module: torch.nn.Module, args: tuple[torch.Tensor, ...], device: str, what: str
) -> dict[str, torch.Tensor]:
    try:
        with torch.inference_mode():
            result = module(*(a.to(device) for a in args))
    except Exception as e:  # the module cannot run on these inputs: bad input, not a mismatch
        shapes = ", ".join(dims_text(tuple(a.shape)) for a in args)
        raise ConvfuseError(f"the {what} module failed on inputs of shape {shapes}: {one_line(e)}") from None
    return _flatten(result)


def _flatten(value: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """Tensors of a module's output by path: ``output``, ``output[0]``, ``output['key']``..."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if value is None:
        return {}
    items: Any
    if isinstance(value, Mapping):
        items = ((f"{prefix}[{k!r}]", v) for k, v in value.items())
    elif isinstance(value, (tuple, list)):
        items = ((f"{prefix}[{i}]", v) for i, v in enumerate(value))
    else:
        raise ConvfuseError(f"module output {prefix} is a {type(value).__name__}; only tensors are compared")
    out: dict[str, torch.Tensor] = {}
    for path, item in items:
        out.update(_flatten(item, path))
    return out


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy; bfloat16 (which numpy lacks) as exact float32."""
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
