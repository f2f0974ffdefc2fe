"""Which torch layers and calls are linear ops: tables from module type / function / method to
a converter (rules as data; adding a layer means adding an entry).

A module converter returns a :class:`~convfuse.frontends.torch.ops.LinearOp`, a ``Decline``
saying why this instance is not one (training-mode Dropout, ``ceil_mode`` pooling, ...), or
None when the layer is simply not linear. A call converter sees a ``torch.fx`` node and
returns a :class:`Unary` (one data input), a :class:`Terms` (a sum of graph tensors), a
``Decline`` or None. Plumbing only: the math is in ``convfuse.algebra``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...algebra import ChannelAffine
from ...decline import Decline, Reason
from ...ir import regroups
from ...spec import ConvSpec, InvalidSpecError, as_array, same_pads
from ...transpose import ConvTransposeSpec
from .layers import affine_from_batchnorm, affine_tensors, spec_from_conv
from .ops import AffineOp, ConvOp, DenseOp, IdentityOp, LinearOp, PadOp, PoolOp, RegroupOp
from .transpose import ConvTransposeNd, ConvTransposeOp, spec_from_conv_transpose

__all__ = [
    "UNKNOWN",
    "Unary",
    "Terms",
    "Cat",
    "MODULE_RULES",
    "FUNCTION_RULES",
    "METHOD_RULES",
    "has_module_rule",
    "module_op",
    "call_op",
]

#: ``resolve(arg)`` result for an argument that is neither a graph tensor nor a constant.
UNKNOWN = object()

Resolve = Callable[[Any], Any]  # fx.Node for a graph tensor, a number/tensor for a constant, or UNKNOWN


@dataclass(eq=False)
class Unary:
    """``op`` applied to the graph tensor ``input``."""

    op: LinearOp
    input: fx.Node


@dataclass(eq=False)
class Terms:
    """A sum of graph tensors, each followed by ``tail`` ops (``-b`` is ``b`` then scale -1)."""

    terms: list[tuple[fx.Node, list[AffineOp]]]


@dataclass(eq=False)
class Cat:
    """Graph tensors concatenated along the channel dim (``torch.cat(xs, dim=1)``)."""

    inputs: list[fx.Node]


CallResult = Unary | Terms | Cat | Decline | None
# MODULE_RULES dispatches on the module's type: each rule takes the type it is registered for.
ModuleRule = Callable[[Any, str], LinearOp | Decline | None]
CallRule = Callable[[fx.Node, Resolve], CallResult]


# --------------------------------------------------------------------------- modules
def _conv_module(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, name: str) -> LinearOp | Decline | None:
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return Decline(Reason.UNSUPPORTED, f"{name} is a lazy conv that has not seen an input yet")
    return ConvOp(name, spec=spec_from_conv(m), dtype=m.weight.dtype, device=m.weight.device)


def _conv_transpose_module(m: ConvTransposeNd, name: str) -> LinearOp | Decline | None:
    """``nn.ConvTranspose1d/2d/3d`` called on one input (a call with ``output_size=`` picks its
    own output padding: the importers see it as a call with two arguments and leave it)."""
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return Decline(Reason.UNSUPPORTED, f"{name} is a lazy transposed conv that has not seen an input yet")
    try:
        spec = spec_from_conv_transpose(m)
    except InvalidSpecError as exc:
        return Decline(Reason.UNSUPPORTED, f"{name}: {exc}")
    return ConvTransposeOp(name, spec=spec, dtype=m.weight.dtype, device=m.weight.device)  # type: ignore[arg-type]


def _linear_module(m: nn.Linear, name: str) -> LinearOp | Decline | None:
    if isinstance(m.weight, nn.parameter.UninitializedParameter):
        return Decline(Reason.UNSUPPORTED, f"{name} is a lazy Linear that has not seen an input yet")
    return DenseOp(name, weight=m.weight.detach(), bias=None if m.bias is None else m.bias.detach())


def _batchnorm_module(ndim: int | None) -> ModuleRule:
    def rule(m: nn.modules.batchnorm._BatchNorm, name: str) -> LinearOp | Decline | None:
        affine = affine_from_batchnorm(m)
        if isinstance(affine, Decline):
            return Decline(affine.reason, f"{name}: {affine.message}")
        # not None: affine_from_batchnorm declines a BatchNorm without running statistics
        scale, shift = affine_tensors(affine, cast(torch.Tensor, m.running_mean))
        return AffineOp(name, scale=scale, shift=shift, vector=True, ndim=ndim)

    return rule


def _identity_module(m: nn.Module, name: str) -> LinearOp | Decline | None:
    return IdentityOp(name)


def _dropout_module(m: nn.modules.dropout._DropoutNd, name: str) -> LinearOp | Decline | None:
    if m.training and m.p > 0:
        return Decline(
            Reason.TRAINING_MODE, f"{name} is a Dropout in training mode (call .eval() to fuse through it)"
        )
    return IdentityOp(name)


def _tuple(value: Any, n: int) -> tuple[int, ...]:
    if isinstance(value, (tuple, list)):
        return tuple(int(v) for v in value) if len(value) == n else tuple(int(value[0]) for _ in range(n))
    return (int(value),) * n


def _pool(
    name: str, n: int, kernel: Any, stride: Any, padding: Any, ceil_mode: bool, count_pad: bool, divisor: Any
) -> LinearOp | Decline:
    """Average pooling as a PoolOp when it is a uniform depthwise conv (DESIGN.md section 2)."""
    k = _tuple(kernel, n)
    s = _tuple(stride, n) if stride not in (None, [], ()) else k
    p = _tuple(padding, n)
    if divisor is not None:
        return Decline(Reason.UNSUPPORTED, f"{name} divides by a fixed divisor_override")
    if any(p) and not count_pad:
        return Decline(Reason.UNSUPPORTED, f"{name} pads without count_include_pad: border divisors vary")
    if ceil_mode:
        return Decline(Reason.UNSUPPORTED, f"{name} uses ceil_mode: its last window may be partial")
    return PoolOp(name, kernel=k, stride=s, pads=tuple((x, x) for x in p))


def _avgpool_module(n: int) -> ModuleRule:
    def rule(m: nn.AvgPool1d | nn.AvgPool2d | nn.AvgPool3d, name: str) -> LinearOp | Decline | None:
        divisor = getattr(m, "divisor_override", None)
        return _pool(name, n, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, divisor)

    return rule


def _pad_pairs(flat: Any, name: str) -> tuple[tuple[int, int], ...] | Decline:
    """torch pad order (last dim first) to (begin, end) pairs in dim order."""
    flat = [int(v) for v in flat]
    if len(flat) % 2 or any(v < 0 for v in flat):
        return Decline(Reason.UNSUPPORTED, f"{name} pads by {flat} (cropping or odd length)")
    pairs = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    return tuple(reversed(pairs))


def _constpad_module(n: int) -> ModuleRule:
    def rule(m: nn.Module, name: str) -> LinearOp | Decline | None:
        if m.value != 0:
            return Decline(Reason.UNSUPPORTED, f"{name} pads with {m.value}, not zero")
        pairs = _pad_pairs(m.padding, name)
        return pairs if isinstance(pairs, Decline) else PadOp(name, pads=pairs, ndim=n)

    return rule


#: Module type -> converter. Subclasses match only when they keep the base forward.
MODULE_RULES: dict[type[nn.Module], ModuleRule] = {
    nn.Conv1d: _conv_module,
    nn.Conv2d: _conv_module,
    nn.Conv3d: _conv_module,
    nn.ConvTranspose1d: _conv_transpose_module,
    nn.ConvTranspose2d: _conv_transpose_module,
    nn.ConvTranspose3d: _conv_transpose_module,
    nn.Linear: _linear_module,
    nn.BatchNorm1d: _batchnorm_module(None),  # [N, C] or [N, C, L]: the region tells
    nn.BatchNorm2d: _batchnorm_module(2),
    nn.BatchNorm3d: _batchnorm_module(3),
    nn.SyncBatchNorm: _batchnorm_module(None),
    nn.Identity: _identity_module,
    nn.Dropout: _dropout_module,
    nn.Dropout1d: _dropout_module,
    nn.Dropout2d: _dropout_module,
    nn.Dropout3d: _dropout_module,
    nn.AlphaDropout: _dropout_module,
    nn.FeatureAlphaDropout: _dropout_module,
    nn.AvgPool1d: _avgpool_module(1),
    nn.AvgPool2d: _avgpool_module(2),
    nn.AvgPool3d: _avgpool_module(3),
    nn.ConstantPad1d: _constpad_module(1),
    nn.ConstantPad2d: _constpad_module(2),
    nn.ConstantPad3d: _constpad_module(3),
}

_FORWARDS = ("forward", "_conv_forward")


def _module_rule(module: nn.Module) -> ModuleRule | None:
    """The rule of the nearest ruled base class, if ``module`` keeps that class's forward.

    A subclass with its own forward (timm's ``BatchNormAct2d``, ``Conv2dSame``) may compute
    something else, so it is not assumed to be its base: torch.fx traces through it instead.
    """
    for cls in type(module).__mro__:
        rule = MODULE_RULES.get(cls)
        if rule is None:
            continue
        if any(getattr(type(module), f, None) is not getattr(cls, f, None) for f in _FORWARDS):
            return None
        return rule
    return None


def has_module_rule(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the tables know (so fx should keep it whole, not trace in)."""
    return _module_rule(module) is not None


def module_op(module: nn.Module, name: str) -> LinearOp | Decline | None:
    """The module as a linear op (``origin`` left for the caller), a reason it is not, or None."""
    rule = _module_rule(module)
    if rule is None:
        return None
    if module._forward_hooks or module._forward_pre_hooks:
        return Decline(Reason.UNSUPPORTED, f"{name} has forward hooks that fusing would drop")
    return rule(module, name)


# --------------------------------------------------------------------------- calls (torch.fx)
def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any] | None:
    """Arguments of ``node`` by name, or None when they do not fit ``names``."""
    if len(node.args) > len(names):
        return None
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names and key not in defaults:
            return None
        bound[key] = value
    return bound if all(n in bound for n in names) else None


def _is_graph(value: Any) -> TypeGuard[fx.Node]:
    return isinstance(value, fx.Node)


def _is_const(value: Any) -> bool:
    return value is not UNKNOWN and not _is_graph(value)


def _times(value: Any, k: float) -> Any:
    return value if k == 1 else value * k


def _is_number(value: Any, target: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == target


def _affine(name: str, scale: Any, shift: Any) -> LinearOp:
    if (scale is None or _is_number(scale, 1)) and (shift is None or _is_number(shift, 0)):
        return IdentityOp(name)
    return AffineOp(name, scale=scale, shift=shift)


def _add_rule(sign: float) -> CallRule:
    """``a + alpha*b`` (``sign`` -1: ``a - alpha*b``) for ``operator``, ``torch`` and methods."""

    def rule(node: fx.Node, resolve: Resolve) -> CallResult:
        bound = _bind(node, ("input", "other"), {"alpha": 1})
        if bound is None:
            return None
        a, b = resolve(bound["input"]), resolve(bound["other"])
        alpha = bound["alpha"]
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
            return None
        coef = sign * alpha
        if _is_graph(a) and _is_graph(b):
            tail: list[AffineOp] = [] if coef == 1 else [AffineOp(f"{node.name}.scale", scale=float(coef))]
            return Terms([(a, []), (b, tail)])
        if _is_graph(a) and _is_const(b):
            return Unary(_affine(node.name, None, _times(b, coef)), a)
        if _is_const(a) and _is_graph(b):
            return Unary(_affine(node.name, float(coef), a), b)
        return None

    return rule


def _mul_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    bound = _bind(node, ("input", "other"), {})
    if bound is None:
        return None
    a, b = resolve(bound["input"]), resolve(bound["other"])
    if _is_graph(a) and _is_const(b):
        return Unary(_affine(node.name, b, None), a)
    if _is_const(a) and _is_graph(b):
        return Unary(_affine(node.name, a, None), b)
    return None


def _reciprocal(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.reciprocal(value.detach().double()).to(value.dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0:
        return 1.0 / value
    return UNKNOWN


def _div_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    bound = _bind(node, ("input", "other"), {"rounding_mode": None})
    if bound is None or bound["rounding_mode"] is not None:
        return None
    a, b = resolve(bound["input"]), resolve(bound["other"])
    if _is_graph(a) and _is_const(b):
        inv = _reciprocal(b)
        return None if inv is UNKNOWN else Unary(_affine(node.name, inv, None), a)
    return None


def _neg_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    bound = _bind(node, ("input",), {})
    a = None if bound is None else resolve(bound["input"])
    return Unary(AffineOp(node.name, scale=-1.0), a) if _is_graph(a) else None


def _same_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    """Calls that return their input's values unchanged (``contiguous``, ``clone``)."""
    bound = _bind(node, ("input",), {"memory_format": torch.contiguous_format})
    a = None if bound is None else resolve(bound["input"])
    return Unary(IdentityOp(node.name), a) if _is_graph(a) else None


def _pad_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    bound = _bind(node, ("input", "pad", "mode", "value"), {"mode": "constant", "value": None})
    if bound is None:
        return None
    a = resolve(bound["input"])
    if not _is_graph(a) or not isinstance(bound["pad"], (tuple, list)):
        return None
    if bound["mode"] != "constant" or bound["value"] not in (None, 0, 0.0):
        return Decline(
            Reason.UNSUPPORTED, f"{node.name} pads in mode {bound['mode']!r} with value {bound['value']}"
        )
    pairs = _pad_pairs(bound["pad"], node.name)
    return pairs if isinstance(pairs, Decline) else Unary(PadOp(node.name, pads=pairs), a)


def _dropout_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    bound = _bind(node, ("input", "p", "training", "inplace"), {"p": 0.5, "training": True, "inplace": False})
    if bound is None:
        return None
    a = resolve(bound["input"])
    if not _is_graph(a):
        return None
    if bound["training"] is not False and bound["p"] != 0:
        return Decline(
            Reason.TRAINING_MODE, f"{node.name} is a dropout call with training={bound['training']}"
        )
    return Unary(IdentityOp(node.name), a)


def _avgpool_rule(n: int) -> CallRule:
    names = (
        "input",
        "kernel_size",
        "stride",
        "padding",
        "ceil_mode",
        "count_include_pad",
        "divisor_override",
    )
    defaults = {
        "stride": None,
        "padding": 0,
        "ceil_mode": False,
        "count_include_pad": True,
        "divisor_override": None,
    }

    def rule(node: fx.Node, resolve: Resolve) -> CallResult:
        bound = _bind(node, names[:-1] if n == 1 else names, defaults)
        if bound is None:
            return None
        a = resolve(bound["input"])
        if not _is_graph(a):
            return None
        op = _pool(
            node.name, n, bound["kernel_size"], bound["stride"], bound["padding"],
            bound["ceil_mode"], bound["count_include_pad"], bound.get("divisor_override"),
        )  # fmt: skip
        return op if isinstance(op, Decline) else Unary(op, a)

    return rule


def _weighted_call(
    node: fx.Node, resolve: Resolve, names: tuple[str, ...], defaults: dict[str, Any], n: int
) -> tuple[dict[str, Any], fx.Node, torch.Tensor, torch.Tensor | None] | None:
    """A conv-like call's arguments, graph input, constant ``n``-D weight and bias, or None."""
    bound = _bind(node, names, defaults)
    if bound is None:
        return None
    x, w = resolve(bound["input"]), resolve(bound["weight"])
    b = None if bound["bias"] is None else resolve(bound["bias"])
    if not _is_graph(x) or not isinstance(w, torch.Tensor) or w.dim() != n + 2:
        return None
    if b is not None and not isinstance(b, torch.Tensor):
        return None
    return bound, x, w, b


def _conv_rule(n: int) -> CallRule:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

    def rule(node: fx.Node, resolve: Resolve) -> CallResult:
        found = _weighted_call(node, resolve, names, defaults, n)
        if found is None:
            return None
        bound, x, w, b = found
        dilation = _tuple(bound["dilation"], n)
        padding = bound["padding"]
        if padding == "same":
            pads = same_pads(w.shape[2:], dilation, upper=True)
        elif padding == "valid":
            pads = ((0, 0),) * n
        else:
            pads = tuple((p, p) for p in _tuple(padding, n))
        spec = ConvSpec(
            weight=as_array(w.detach()),
            bias=None if b is None else as_array(b.detach()),
            stride=_tuple(bound["stride"], n),
            dilation=dilation,
            groups=int(bound["groups"]),
            pads=pads,
        )
        return Unary(ConvOp(node.name, spec=spec, dtype=w.dtype, device=w.device), x)

    return rule


def _conv_transpose_rule(n: int) -> CallRule:
    """``F.conv_transpose{n}d(x, weight, bias, stride, padding, output_padding, groups, dilation)``
    with constant weight and bias (torch's symmetric ``padding``: ``(p, p)`` crops)."""
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
    defaults = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}

    def rule(node: fx.Node, resolve: Resolve) -> CallResult:
        found = _weighted_call(node, resolve, names, defaults, n)
        if found is None:
            return None
        bound, x, w, b = found
        if not all(isinstance(bound[k], (int, tuple, list)) for k in names[3:]):
            return None
        try:
            spec = ConvTransposeSpec(
                weight=w.detach().to("cpu", torch.float64).numpy(),
                bias=None if b is None else b.detach().to("cpu", torch.float64).numpy(),
                stride=_tuple(bound["stride"], n),
                dilation=_tuple(bound["dilation"], n),
                groups=int(bound["groups"]),
                pads=tuple((p, p) for p in _tuple(bound["padding"], n)),
                output_padding=_tuple(bound["output_padding"], n),
            )
        except InvalidSpecError as exc:
            return Decline(Reason.UNSUPPORTED, f"{node.name}: {exc}")
        op = ConvTransposeOp(node.name, spec=spec, dtype=w.dtype, device=w.device)  # type: ignore[arg-type]
        return Unary(op, x)

    return rule


def _linear_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    """``F.linear(x, weight, bias)`` with constant weight and bias: a Linear layer."""
    bound = _bind(node, ("input", "weight", "bias"), {"bias": None})
    if bound is None:
        return None
    x, w = resolve(bound["input"]), resolve(bound["weight"])
    b = None if bound["bias"] is None else resolve(bound["bias"])
    if not _is_graph(x) or not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    if b is not None and not isinstance(b, torch.Tensor):
        return None
    return Unary(DenseOp(node.name, weight=w.detach(), bias=None if b is None else b.detach()), x)


def _batchnorm_call(node: fx.Node, resolve: Resolve, bound: dict[str, Any] | None) -> CallResult:
    """Inference batch norm called as a function: a per-channel affine (DESIGN.md section 2).

    Pattern: ``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)``
    (what BatchNorm subclasses with their own forward, such as timm's ``BatchNormAct2d``, call).
    Conditions: ``training`` is the constant False (True normalises with batch statistics),
    the statistics, weight and bias are constant tensors (``get_attr``), ``eps`` a number.
    Algebra: ``a = weight / sqrt(running_var + eps)``, ``y = a * x + (bias - running_mean * a)``
    along dim 1, via ``ChannelAffine.from_batchnorm``; ``momentum`` only matters in training.
    """
    if bound is None:
        return None
    x = resolve(bound["input"])
    if not _is_graph(x):
        return None
    training = bound["training"]
    if _is_graph(training) or training is UNKNOWN or bool(training):
        if bound["running_mean"] is None and bound["running_var"] is None:
            return Decline(
                Reason.TRAINING_MODE,
                f"{node.name} is a batch_norm call without running statistics (track_running_stats=False): "
                "it always normalises with batch statistics",
            )
        how = "computed at run time" if _is_graph(training) else repr(training)
        return Decline(
            Reason.TRAINING_MODE,
            f"{node.name} is a batch_norm call with training={how} and normalises with batch statistics; "
            "call .eval() before fusing",
        )
    values: dict[str, Any] = {}  # tensors; None for an absent weight or bias
    for key in ("running_mean", "running_var", "weight", "bias"):
        value = bound[key]
        if value is None and key in ("weight", "bias"):
            values[key] = None
            continue
        value = resolve(value)
        if _is_graph(value):
            return Decline(
                Reason.NON_CONSTANT, f"{node.name} reads its {key} from a tensor computed in the graph"
            )
        if not isinstance(value, torch.Tensor):
            return None  # no running statistics: torch itself refuses training=False
        values[key] = value.detach()
    eps = bound["eps"]
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        return None
    affine = ChannelAffine.from_batchnorm(
        values["running_mean"], values["running_var"], values["weight"], values["bias"], float(eps)
    )
    scale, shift = affine_tensors(affine, values["running_mean"])
    return Unary(AffineOp(node.name, scale=scale, shift=shift, vector=True), x)


_BN_DEFAULTS = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}


def _functional_batchnorm_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    """``torch.nn.functional.batch_norm`` (argument order: statistics before weight and bias)."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    return _batchnorm_call(node, resolve, _bind(node, names, _BN_DEFAULTS))


def _torch_batchnorm_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    """``torch.batch_norm`` (argument order: weight and bias before the statistics)."""
    names = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
             "cudnn_enabled")  # fmt: skip
    return _batchnorm_call(node, resolve, _bind(node, names, {}))


def _meta_shape(node: Any) -> tuple[int, ...] | None:
    """The shape torch.fx's ShapeProp recorded for ``node`` (example or inferred input), or None."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    shape = getattr(meta, "shape", None)
    return None if shape is None else tuple(int(d) for d in shape)


def _last(dim: Any, rank: int) -> bool | None:
    """Whether ``dim`` names the last of ``rank`` dims (None: not an int)."""
    if not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank:
        return None
    return dim % rank == rank - 1


def _regroup(
    node: fx.Node, x: Any, resolve: Resolve, dim: Any = None, rank_after: bool = False
) -> CallResult:
    """A reshape that keeps the last dim and regroups the dims before it (DESIGN.md section 5):
    the identity on a Linear layer's features (:func:`convfuse.ir.regroups`), which the planner
    takes only among last-dim layers. Judged on the shapes shape propagation recorded (example
    inputs, or the input the self-check infers); ``dim``, when the call names one, must be a dim
    before the last (of the output for ``unsqueeze``: ``rank_after``), so the judgement holds at
    every size."""
    x = resolve(x)
    before, after = _meta_shape(x), _meta_shape(node)
    if not _is_graph(x) or before is None or after is None or not regroups(before, after):
        return None
    if dim is not None and _last(dim, len(after) if rank_after else len(before)) is not False:
        return None
    return Unary(RegroupOp(node.name), x)


def _flatten_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    """``x.flatten(s, e)`` / ``torch.flatten`` with ``e`` before the last dim (``flatten(0, 1)``)."""
    bound = _bind(node, ("input", "start_dim", "end_dim"), {"start_dim": 0, "end_dim": -1})
    return None if bound is None else _regroup(node, bound["input"], resolve, bound["end_dim"])


def _squeeze_rule(unsqueeze: bool) -> CallRule:
    """``x.squeeze(d)`` / ``x.unsqueeze(d)`` of a unit dim before the last (``squeeze()`` of every
    unit dim is not read: it drops a last dim of size 1 too)."""

    def rule(node: fx.Node, resolve: Resolve) -> CallResult:
        bound = _bind(node, ("input", "dim"), {})
        if bound is None or isinstance(bound["dim"], (tuple, list)):
            return None
        return _regroup(node, bound["input"], resolve, bound["dim"], rank_after=unsqueeze)

    return rule


def _reshape_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    """``x.reshape(*sizes)`` / ``view`` / ``torch.reshape`` whose last size is not ``-1`` (which
    keeps the last dim at one size only), ``x.reshape(t.shape)``, ``reshape_as(t)``, ``view_as(t)``."""
    if len(node.args) < 2 or set(node.kwargs) - {"shape", "other"}:
        return None
    sizes = node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if not sizes or _is_number(sizes[-1], -1):
        return None
    return _regroup(node, node.args[0], resolve)


def _cat_rule(node: fx.Node, resolve: Resolve) -> CallResult:
    """``torch.cat(tensors, dim=1)`` of graph tensors: stacked channels (a CONCAT)."""
    bound = _bind(node, ("tensors", "dim"), {"dim": 0})
    if bound is None or bound["dim"] != 1 or not isinstance(bound["tensors"], (list, tuple)):
        return None
    parts = [resolve(t) for t in bound["tensors"]]
    if len(parts) < 2 or not all(_is_graph(p) for p in parts):
        return None
    return Cat(parts)


#: Function called by a ``call_function`` node -> converter.
FUNCTION_RULES: dict[Any, CallRule] = {
    operator.add: _add_rule(1),
    torch.add: _add_rule(1),
    operator.sub: _add_rule(-1),
    torch.sub: _add_rule(-1),
    torch.subtract: _add_rule(-1),
    operator.mul: _mul_rule,
    torch.mul: _mul_rule,
    torch.multiply: _mul_rule,
    operator.truediv: _div_rule,
    torch.div: _div_rule,
    torch.true_divide: _div_rule,
    operator.neg: _neg_rule,
    torch.neg: _neg_rule,
    torch.clone: _same_rule,
    torch.cat: _cat_rule,
    torch.concat: _cat_rule,
    F.pad: _pad_rule,
    F.dropout: _dropout_rule,
    F.dropout1d: _dropout_rule,
    F.dropout2d: _dropout_rule,
    F.dropout3d: _dropout_rule,
    F.alpha_dropout: _dropout_rule,
    F.feature_alpha_dropout: _dropout_rule,
    F.avg_pool1d: _avgpool_rule(1),
    F.avg_pool2d: _avgpool_rule(2),
    F.avg_pool3d: _avgpool_rule(3),
    F.conv1d: _conv_rule(1),
    F.conv2d: _conv_rule(2),
    F.conv3d: _conv_rule(3),
    F.conv_transpose1d: _conv_transpose_rule(1),
    F.conv_transpose2d: _conv_transpose_rule(2),
    F.conv_transpose3d: _conv_transpose_rule(3),
    F.linear: _linear_rule,
    F.batch_norm: _functional_batchnorm_rule,
    torch.batch_norm: _torch_batchnorm_rule,
    torch.flatten: _flatten_rule,
    torch.reshape: _reshape_rule,
    torch.squeeze: _squeeze_rule(False),
    torch.unsqueeze: _squeeze_rule(True),
}

#: Tensor method called by a ``call_method`` node -> converter (``self`` is the first argument).
METHOD_RULES: dict[str, CallRule] = {
    "add": _add_rule(1),
    "sub": _add_rule(-1),
    "subtract": _add_rule(-1),
    "mul": _mul_rule,
    "multiply": _mul_rule,
    "div": _div_rule,
    "true_divide": _div_rule,
    "neg": _neg_rule,
    "contiguous": _same_rule,
    "clone": _same_rule,
    "flatten": _flatten_rule,
    "reshape": _reshape_rule,
    "view": _reshape_rule,
    "reshape_as": _reshape_rule,
    "view_as": _reshape_rule,
    "squeeze": _squeeze_rule(False),
    "unsqueeze": _squeeze_rule(True),
}


def call_op(node: fx.Node, resolve: Resolve) -> CallResult:
    """A ``call_function`` / ``call_method`` node as a linear op, a sum, a reason, or None."""
    if node.op == "call_function":
        try:
            rule = FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    elif node.op == "call_method":
        rule = METHOD_RULES.get(cast(str, node.target))  # fx types targets as Callable | str
    else:
        return None
    return None if rule is None else rule(node, resolve)
