"""The torch front end's self-check: run the original and the fused module side by side before
``convfuse.fuse`` returns, and put back every part that raises or does not match.

The judgement is the verifier's (:func:`convfuse.compare.compare` with
:func:`convfuse.compare.tolerance_for`, per dtype). Inputs are the caller's ``example_inputs``
plus a second random batch of the same shape, or, without them, an input inferred for a model
that starts with a conv (:func:`infer_example_input`). Hooks are switched off while convfuse runs
a model (the caller's hooks never see convfuse's batches), and the caller's module is never run:
only copies are.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from ...compare import compare, tolerance_for
from ...errors import one_line
from ...sizes import Geometry, NoSizeError, choose_sizes
from .surgery import HOOK_TABLES

__all__ = [
    "example_spatial_size",
    "infer_example_input",
    "candidate_inputs",
    "random_like",
    "quiet",
    "run_quietly",
    "outputs_match",
    "sequentials_called_whole",
    "Batches",
    "Part",
    "put_back_failures",
]

_CONV = nn.modules.conv._ConvNd
_POOLS = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._LPPoolNd)


# --------------------------------------------------------------------------- inputs
def example_spatial_size(
    strides: Sequence[Sequence[int]],
    kernels: Sequence[Sequence[int]],
    ndim: int,
    *,
    minimum: int = 8,
    limit: int = 256,
) -> tuple[int, ...]:
    """A small spatial size (per dim) that every stride of a model allows.

    ``strides``/``kernels``: one tuple per layer (convs and pools; broadcast from one value).
    Per dim, the product of all strides (the deepest possible downsampling, an upper bound when
    branches run in parallel) capped at ``limit``, times the smallest factor that makes the size
    at least ``minimum`` and twice the largest kernel. Sizes are multiples of the product, so
    every stride divides every intermediate size down to 1.
    """
    size = []
    for d in range(ndim):
        product = 1
        for s in strides:
            product *= int(s[d] if len(s) > d else s[0])
        product = max(1, min(product, limit))
        biggest = max((int(k[d] if len(k) > d else k[0]) for k in kernels), default=1)
        need = max(minimum, 2 * biggest)
        size.append(min(limit, product * math.ceil(need / product)))
    return tuple(size)


def _first_leaf_with_weights(module: nn.Module) -> nn.Module | None:
    for m in module.modules():
        if next(m.children(), None) is None and (
            next(m.parameters(recurse=False), None) is not None
            or next(m.buffers(recurse=False), None) is not None
        ):
            return m
    return None


def infer_example_input(
    module: nn.Module, batch: int = 2, seed: int = 0, scale: int = 1, spatial: Sequence[int] | None = None
) -> tuple[torch.Tensor] | None:
    """A random ``[batch, C, *spatial]`` input for a model that starts with a conv, else None.

    "Starts with a conv": the first leaf layer holding weights, in registration order, is a
    ``ConvNd`` (or ``ConvTransposeNd``); ``C`` comes from its weight, the spatial size (unless
    given) from :func:`example_spatial_size` over every conv and pooling layer of the model
    (times ``scale``), dtype and device from the weight.
    """
    first = _first_leaf_with_weights(module)
    if not isinstance(first, _CONV) or isinstance(first.weight, nn.parameter.UninitializedParameter):
        return None
    ndim = first.weight.dim() - 2
    if first.transposed:
        channels = int(first.weight.shape[0])
    else:
        channels = int(first.weight.shape[1]) * first.groups
    strides, kernels = [], []
    for m in module.modules():
        if isinstance(m, _CONV) and m.weight.dim() - 2 == ndim:
            strides.append(tuple(m.stride) if not m.transposed else (1,))
            kernels.append(tuple((k - 1) * d + 1 for k, d in zip(m.kernel_size, m.dilation)))
        elif isinstance(m, _POOLS):
            # an int or a tuple: not every pool annotates them, so mypy reads Module.__getattr__'s type
            size: Any = m.kernel_size
            k = size if isinstance(size, (tuple, list)) else (size,)
            stride: Any = m.stride
            s = stride if stride not in (None, (), []) else k
            strides.append(tuple(s) if isinstance(s, (tuple, list)) else (int(s),))
            kernels.append(tuple(int(v) for v in k))
    if spatial is None:
        spatial = tuple(n * scale for n in example_spatial_size(strides, kernels, ndim))
    elif len(spatial) != ndim:
        return None
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, channels, *spatial), generator=gen, dtype=torch.float64)
    return (x.to(device=first.weight.device, dtype=first.weight.dtype),)


def _geometry(m: nn.Module, ndim: int) -> Geometry | None:
    """A conv or pooling layer as :mod:`convfuse.sizes` sees it on an ``ndim``-D input (None:
    some other layer, or a conv of another rank)."""
    pair = lambda v, n: tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * n  # noqa: E731
    if isinstance(m, _CONV):
        n = m.weight.dim() - 2
        if n != ndim:
            return None
        pads: tuple[tuple[int, int], ...]
        if isinstance(m.padding, str):
            same, pads = m.padding == "same", ()
        else:
            same, pads = False, tuple((int(p), int(p)) for p in m.padding)
        return Geometry(
            kernel=tuple(m.kernel_size), stride=pair(m.stride, n), dilation=pair(m.dilation, n), pads=pads,
            same=same, transposed=bool(m.transposed),
            output_padding=tuple(m.output_padding) if m.transposed else (),
        )  # fmt: skip
    if isinstance(m, _POOLS):
        n = ndim
        kernel = pair(m.kernel_size, n)
        stride = m.stride if m.stride not in (None, (), []) else kernel
        padding = pair(getattr(m, "padding", 0), n)
        return Geometry(
            kernel=tuple(kernel), stride=pair(stride, n), dilation=pair(getattr(m, "dilation", 1), n),
            pads=tuple((int(p), int(p)) for p in padding), ceil_mode=bool(getattr(m, "ceil_mode", False)),
        )  # fmt: skip
    return None


def derived_spatial_sizes(module: nn.Module, ndim: int) -> list[tuple[int, ...]]:
    """The sizes :func:`convfuse.sizes.choose_sizes` (the ONNX verifier's derivation) gives for
    ``module``'s convs and pools read as one chain in registration order: the second size (every
    kernel tap reads real input) first, then the smallest. Parallel branches read as a chain
    over-constrain, so a size may still fail; the caller tries the next. [] when none is found."""
    layers = []
    for m in module.modules():
        geometry = _geometry(m, ndim)
        if geometry is not None and len(geometry.kernel) == ndim:
            layers.append(geometry)
    try:
        choice = choose_sizes(layers, ndim)
    except NoSizeError:
        return []
    return list(dict.fromkeys([tuple(choice.second), tuple(choice.first)]))


def candidate_inputs(module: nn.Module, small: int = 8) -> list[tuple[torch.Tensor]]:
    """Inputs to try, in order, for a model that starts with a conv (else none): the sizes
    :func:`derived_spatial_sizes` gives, then sizes ``small * 2**j`` below the
    :func:`example_spatial_size` one (which over-counts the strides of parallel branches), then
    that size and twice and four times it."""
    base = infer_example_input(module)
    if base is None:
        return []
    size = tuple(base[0].shape[2:])
    out = [
        infer_example_input(module, spatial=derived) for derived in derived_spatial_sizes(module, len(size))
    ]
    n = small
    while n < max(size):
        out.append(infer_example_input(module, spatial=(n,) * len(size)))
        n *= 2
    out += [base] + [infer_example_input(module, scale=k) for k in (2, 4)]
    return [x for x in out if x is not None]


def random_like(inputs: tuple[Any, ...], seed: int = 1) -> tuple[Any, ...]:
    """Inputs of the same structure with fresh random floating-point tensors (others kept)."""
    gen = torch.Generator().manual_seed(seed)

    def fresh(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float64)
            return noise.to(device=value.device, dtype=value.dtype)
        if isinstance(value, (list, tuple)):
            return type(value)(fresh(v) for v in value)
        if isinstance(value, dict):
            return {k: fresh(v) for k, v in value.items()}
        return value

    return tuple(fresh(v) for v in inputs)


# --------------------------------------------------------------------------- running
@contextmanager
def quiet(model: nn.Module) -> Iterator[None]:
    """Every module of ``model`` without its hooks for the duration (restored afterwards)."""
    saved = []
    for m in model.modules():
        for table in HOOK_TABLES:
            hooks = getattr(m, table, None)
            if hooks:
                saved.append((m, table, hooks))
                setattr(m, table, type(hooks)())
    try:
        yield
    finally:
        for m, table, hooks in saved:
            setattr(m, table, hooks)


def run_quietly(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """``model(*inputs)`` without gradients and without the model's hooks."""
    with quiet(model), torch.no_grad():
        return model(*inputs)


def sequentials_called_whole(model: nn.Module, inputs: tuple[Any, ...]) -> set[str] | None:
    """Paths of the ``nn.Sequential`` modules of ``model`` that are called as a whole on
    ``inputs``: called at least once, and every call of a child made from inside the Sequential's
    own call. A parent that loops over a Sequential's children (routing by attribute) calls the
    children itself: such a Sequential is not in the set. None when the model does not run."""
    names = {id(m): name for name, m in model.named_modules()}
    stack: list[str] = []
    callers: dict[str, set[str | None]] = {}
    handles = []

    def pre(m: nn.Module, _: Any) -> None:
        path = names.get(id(m), "?")
        callers.setdefault(path, set()).add(stack[-1] if stack else None)
        stack.append(path)

    def post(m: nn.Module, _: Any, __: Any) -> None:
        if stack:
            stack.pop()

    with quiet(model):
        try:
            for m in model.modules():
                handles.append(m.register_forward_pre_hook(pre))
                handles.append(m.register_forward_hook(post))
            with torch.no_grad():
                model(*inputs)
        except Exception:  # noqa: BLE001 - no observation; the caller treats this as unknown
            return None
        finally:
            for handle in handles:
                handle.remove()
    whole = set()
    for name, m in model.named_modules():
        if not isinstance(m, nn.Sequential) or name not in callers:
            continue
        kids = [_join(name, key) for key in m._modules]
        if all(callers.get(k, {name}) <= {name} for k in kids):
            whole.add(name)
    return whole


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------- comparing
def _array(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def outputs_match(reference: Any, candidate: Any) -> tuple[bool, float, str]:
    """``(passed, max relative error, why not)`` for two outputs of the same model call: the same
    structure, shapes and dtypes, tensors within the verifier's tolerance for their dtype."""
    ref_leaves, ref_spec = tree_flatten(reference)
    out_leaves, out_spec = tree_flatten(candidate)
    if ref_spec != out_spec:
        return False, math.inf, f"returns {out_spec} instead of {ref_spec}"
    worst = 0.0
    for i, (r, c) in enumerate(zip(ref_leaves, out_leaves)):
        if not isinstance(r, torch.Tensor):
            if isinstance(c, torch.Tensor) or r != c:
                return False, math.inf, f"output {i} is {c!r} instead of {r!r}"
            continue
        if not isinstance(c, torch.Tensor) or c.shape != r.shape or c.dtype != r.dtype:
            got = f"{tuple(c.shape)} {c.dtype}" if isinstance(c, torch.Tensor) else type(c).__name__
            return False, math.inf, f"output {i} is {got} instead of {tuple(r.shape)} {r.dtype}"
        rtol, atol, exact = tolerance_for(str(r.dtype).removeprefix("torch."))
        result = compare(_array(r), _array(c), rtol=rtol, atol=atol, exact=exact)
        worst = max(worst, result.max_rel_error)
        if not result.passed:
            return (
                False,
                worst,
                (f"output {i} differs by {result.max_rel_error:.2e} of its scale (tolerance {rtol:g})"),
            )
    return True, worst, ""


@dataclass
class Batches:
    """The inputs a fused model is checked on and the original's outputs for them."""

    inputs: list[tuple[Any, ...]]
    references: list[Any]
    source: str  # "example inputs" or "an inferred input"

    def check(self, model: nn.Module) -> tuple[bool, float, str]:
        """``(passed, max relative error, why not)`` of ``model`` on every batch."""
        worst = 0.0
        for inputs, ref in zip(self.inputs, self.references):
            try:
                out = run_quietly(model, inputs)
            except Exception as exc:  # noqa: BLE001 - a fused model that raises fails the check
                return False, math.inf, f"raises {type(exc).__name__}: {one_line(exc, 200)}"
            ok, err, why = outputs_match(ref, out)
            worst = max(worst, err)
            if not ok:
                return False, worst, why
        return True, worst, ""


# --------------------------------------------------------------------------- putting back
@dataclass(eq=False)
class Part:
    """A module convfuse changed: the object in the fused model, and where it came from."""

    fused: nn.Module
    original: nn.Module  # in the caller's model (never run, only copied)
    path: str  # of ``original`` in the caller's model

    @property
    def depth(self) -> int:
        return self.path.count(".") + 1 if self.path else 0


def _revert(model: nn.Module, part: Part) -> nn.Module:
    """``model`` with ``part`` replaced by a copy of its original (the whole model for the root)."""
    if part.fused is model:
        return copy.deepcopy(part.original)
    for m in model.modules():
        for key, child in list(m._modules.items()):
            if child is part.fused:
                m._modules[key] = copy.deepcopy(part.original)
    return model


def _with_part(original: nn.Module, part: Part) -> nn.Module:
    """A copy of the original model with only ``part`` (and what it contains) fused."""
    if not part.path:
        return copy.deepcopy(part.fused)
    model = copy.deepcopy(original)
    owner, _, leaf = part.path.rpartition(".")
    target = model.get_submodule(owner) if owner else model
    target._modules[leaf] = copy.deepcopy(part.fused)
    return model


def put_back_failures(
    original: nn.Module,
    fused: nn.Module,
    parts: Sequence[Part],
    check: Callable[[nn.Module], tuple[bool, float, str]],
) -> tuple[nn.Module, list[tuple[Part, str]]]:
    """``fused`` with every part that fails ``check`` put back as it was.

    When the whole passes, nothing changes. Otherwise each part is checked inside an otherwise
    original model, innermost first, and a failing one is replaced by a copy of its original.
    If the remaining whole still fails (parts that fail only together), the original model
    comes back, every remaining part named. Returns the model and ``(part, why)`` per part put back.
    """

    def on_copy(make: Callable[[], nn.Module]) -> tuple[bool, float, str]:
        """``check`` on a fresh copy (the returned module's state stays as built)."""
        try:
            model = make()
        except Exception as exc:  # noqa: BLE001 - a fused module that cannot be copied fails
            return False, math.inf, f"cannot be copied ({type(exc).__name__}: {one_line(exc, 200)})"
        return check(model)

    ok, _, why = on_copy(lambda: copy.deepcopy(fused))
    if ok:
        return fused, []
    failed: list[tuple[Part, str]] = []
    for part in sorted(parts, key=lambda p: -p.depth):
        ok, _, why = on_copy(lambda: _with_part(original, part))  # noqa: B023 - called at once
        if not ok:
            failed.append((part, why))
            fused = _revert(fused, part)
    ok, _, why = on_copy(lambda: copy.deepcopy(fused))
    if not ok:
        done = {id(p) for p, _ in failed}
        failed += [(p, f"the fused parts together {why}") for p in parts if id(p) not in done]
        fused = copy.deepcopy(original)
    return fused, failed
