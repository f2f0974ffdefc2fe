"""ONNX nodes as linear maps: read a node into a :class:`~convfuse.spec.ConvSpec`, write one back.

Plumbing only. A reader looks at one node and its constant inputs and returns a
:class:`LinearOp` (a node that maps one activation tensor to another as a convolution), a
:class:`LinearOp` carrying the reason it cannot be used (``refused``), or ``None`` when the node
is not linear at all (Relu, MaxPool, an Add of two activations...). Readers are a table,
:data:`READERS`, from op type to function; adding an op means adding an entry.

Readers look only at shapes, types and attributes; weights are read when :meth:`LinearOp.spec`
is called for a run being merged: a numpy view of the initializer's bytes, cast once to float64
(the precision the algebra works in).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...algebra import MAX_MERGED_ELEMENTS, ChannelAffine, affine_conv, average_pool, identity
from ...algebra_linear import as_matrix, linear_spec
from ...decline import Decline, Reason
from ...ir import regroups
from ...provenance import Provenance, describe
from ...spec import ConvSpec, InvalidSpecError, same_pads
from .io import node_attributes as _attrs

__all__ = [
    "FLOAT_TYPES",
    "Env",
    "LinearOp",
    "READERS",
    "read_linear",
    "label",
    "conv_node",
    "linear_nodes",
    "NewTensor",
    "cast_weights",
    "mark_merged",
    "merged_from",
    "unread_nodes",
]

#: Element types convfuse merges: float32, float16, float64 (ONNX ``TensorProto`` codes).
FLOAT_TYPES: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
}
#: Floating types that are not merged (a typed decline rather than silence).
_OTHER_FLOAT_TYPES = {
    onnx.TensorProto.BFLOAT16,
    getattr(onnx.TensorProto, "FLOAT8E4M3FN", -1),
    getattr(onnx.TensorProto, "FLOAT8E4M3FNUZ", -1),
    getattr(onnx.TensorProto, "FLOAT8E5M2", -1),
    getattr(onnx.TensorProto, "FLOAT8E5M2FNUZ", -1),
}

Pads = tuple[tuple[int, int], ...]
Dims = tuple[int | None, ...]


class Env(Protocol):
    """What a reader may ask about the graph around a node."""

    opset: int  # version of the default ONNX domain

    def tensor(self, name: str) -> onnx.TensorProto | str:
        """The constant value of ``name``, or a phrase saying why it is not constant."""

    def shape(self, name: str) -> Dims | None:
        """Inferred dims of ``name`` (``None`` entries unknown), or ``None`` if the rank is unknown."""


@dataclass(frozen=True, eq=False)
class LinearOp:
    """A node computing ``y = conv(x)`` for some convolution, with ``x`` its only activation input.

    ``ndim`` and channel counts are filled in when the node itself fixes them (a Conv does, a
    per-channel Mul does not); :meth:`spec` receives them from the run the node sits in.
    """

    node: onnx.NodeProto
    # "conv", "convtranspose", "linear", "bn", "mul", "add", "sub", "div", "neg", "pad", "avgpool",
    # "reshape"
    kind: str
    x: str
    y: str
    ndim: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    elem_type: int | None = None  # activation element type when the node fixes it
    resolve: Callable[[int, int], Any] | None = None  # a ConvSpec (ConvTransposeSpec) or a Decline
    refused: Decline | None = None  # set when the node looks linear but cannot be merged

    @property
    def is_conv(self) -> bool:
        return self.kind in ("conv", "linear")

    def spec(self, ndim: int, channels: int) -> Any:
        """This node as a float64 conv (a transposed conv for ``ConvTranspose``) on a ``ndim``-D
        tensor with ``channels`` input channels, or a Decline."""
        if self.refused is not None:
            return self.refused
        if self.ndim is not None and self.ndim != ndim:
            return Decline(
                Reason.RANK_MISMATCH, f"{label(self.node)} is {self.ndim}D in a run of {ndim}D convs"
            )
        assert self.resolve is not None
        try:
            return self.resolve(ndim, channels)
        except InvalidSpecError as exc:
            return Decline(Reason.UNSUPPORTED, f"{label(self.node)}: {exc}")


def label(node: onnx.NodeProto) -> str:
    """How reports name a node: its name, or its op type and first output when it has none."""
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _refuse(node: onnx.NodeProto, kind: str, x: str, reason: Reason, message: str) -> LinearOp:
    return LinearOp(node, kind, x, node.output[0], refused=Decline(reason, f"{label(node)}: {message}"))


def _values(tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values in its own dtype: a read-only view of ``raw_data`` (no copy) where the
    bytes are little-endian raw data, else what ``numpy_helper`` builds from the typed fields."""
    dtype = FLOAT_TYPES.get(tensor.data_type)
    if dtype is not None and tensor.HasField("raw_data") and not tensor.external_data:
        dims = tuple(int(d) for d in tensor.dims)
        if len(tensor.raw_data) == math.prod(dims) * dtype.itemsize:
            return np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<")).reshape(dims)
    return numpy_helper.to_array(tensor)


def _type_problem(tensor: onnx.TensorProto, what: str) -> tuple[Reason, str] | None:
    if tensor.data_type in FLOAT_TYPES:
        return None
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    if tensor.data_type in _OTHER_FLOAT_TYPES:
        return Reason.DTYPE, f"{what} is {name}; convfuse merges float32, float16 and float64"
    return Reason.DTYPE, f"{what} has element type {name}, not floating point"


def _constant(env: Env, name: str, what: str) -> onnx.TensorProto | tuple[Reason, str]:
    found = env.tensor(name)
    if isinstance(found, str):
        return Reason.NON_CONSTANT, f"{what} {name!r} is {found}"
    problem = _type_problem(found, f"{what} {name!r}")
    return problem if problem is not None else found


def _non_finite(node: onnx.NodeProto, *tensors: tuple[str, str, np.ndarray | None]) -> Decline | None:
    """A NON_FINITE decline naming the first of ``(what, name, values)`` holding NaN or Inf."""
    for what, name, values in tensors:
        if values is None:
            continue
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(values.sum(dtype=np.float64)):  # NaN and Inf reach the sum; one pass
                continue
        count = int(values.size - np.count_nonzero(np.isfinite(values)))  # the sum may just overflow
        if count:
            return Decline(
                Reason.NON_FINITE,
                f"{label(node)}: {what} {name!r} of shape {list(values.shape)} has {count} NaN/Inf value(s)",
            )
    return None


# --------------------------------------------------------------------------- geometry
def _geometry_problem(kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> str | None:
    """Why these attributes describe no window (wrong lengths, sizes below 1), or ``None``."""
    n = len(kernel)
    if len(strides) != n or len(dilations) != n:
        return f"strides {list(strides)} or dilations {list(dilations)} are not {n}D"
    if min(kernel, default=1) < 1 or min(strides, default=1) < 1 or min(dilations, default=1) < 1:
        return f"kernel {list(kernel)}, strides {list(strides)} and dilations {list(dilations)} must be >= 1"
    return None


def _explicit_pads(
    attrs: dict[str, Any],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    x_shape: Dims | None,
) -> Pads | str:
    """Begin/end pads for every ``auto_pad`` form, or a sentence saying why they are unknown.

    ``SAME_*`` follows the ONNX definition: output ``ceil(n / s)``, total padding
    ``max(0, (out - 1) * s + extent - n)``, the odd element at the end (UPPER) or the beginning
    (LOWER). At stride 1 that does not depend on ``n``; otherwise the input size must be static.
    """
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad == "NOTSET":
        flat = list(attrs.get("pads", [0] * 2 * n))
        if len(flat) != 2 * n:
            return f"has {len(flat)} pads for {n} spatial dims"
        if min(flat, default=0) < 0:
            return f"has negative pads {flat}"
        return tuple((int(flat[i]), int(flat[i + n])) for i in range(n))
    if auto_pad == "VALID":
        return ((0, 0),) * n
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return f"has unknown auto_pad {auto_pad!r}"
    upper = auto_pad == "SAME_UPPER"
    if all(s == 1 for s in strides):
        return same_pads(kernel, dilations, upper=upper)
    spatial = None if x_shape is None or len(x_shape) != n + 2 else x_shape[2:]
    if spatial is None or any(d is None or d <= 0 for d in spatial):
        return (
            f"uses auto_pad={auto_pad} with strides {list(strides)}: its padding depends on the input "
            "size, which is not static here"
        )
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        assert size is not None
        extent = d * (k - 1) + 1
        out = -(-size // s)
        total = max(0, (out - 1) * s + extent - size)
        small = total // 2
        pads.append((small, total - small) if upper else (total - small, small))
    return tuple(pads)


# --------------------------------------------------------------------------- readers
def read_conv(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """``Conv(X, W[, B])`` with constant ``W`` and ``B``; every ``auto_pad`` form, 1D to 3D."""
    if len(node.input) < 2 or len(node.output) != 1:
        return None
    x, w_name = node.input[0], node.input[1]
    b_name = node.input[2] if len(node.input) > 2 else ""
    w = _constant(env, w_name, "weight")
    if isinstance(w, tuple):
        return _refuse(node, "conv", x, *w)
    dims = [int(d) for d in w.dims]
    if not 3 <= len(dims) <= 5:
        return _refuse(node, "conv", x, Reason.UNSUPPORTED, f"weight of shape {dims} is not 1D, 2D or 3D")
    n = len(dims) - 2
    attrs = _attrs(node)
    kernel = list(attrs.get("kernel_shape", dims[2:]))
    if kernel != dims[2:]:
        return _refuse(
            node, "conv", x, Reason.UNSUPPORTED, f"kernel_shape {kernel} does not match weight {dims}"
        )
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    group = int(attrs.get("group", 1))
    problem = _geometry_problem(kernel, strides, dilations)
    if problem is not None:
        return _refuse(node, "conv", x, Reason.UNSUPPORTED, problem)
    pads = _explicit_pads(attrs, kernel, strides, dilations, env.shape(x))
    if isinstance(pads, str):
        return _refuse(node, "conv", x, Reason.UNSUPPORTED, pads)
    b: onnx.TensorProto | None = None
    if b_name:
        found = _constant(env, b_name, "bias")
        if isinstance(found, tuple):
            return _refuse(node, "conv", x, *found)
        b = found
        if list(b.dims) != [dims[0]]:
            return _refuse(
                node, "conv", x, Reason.UNSUPPORTED, f"bias of shape {list(b.dims)} for {dims[0]} outputs"
            )
    if group < 1 or dims[0] % group:
        return _refuse(
            node, "conv", x, Reason.UNSUPPORTED, f"group={group} does not divide {dims[0]} outputs"
        )

    def resolve(ndim: int, channels: int) -> ConvSpec | Decline:
        # One float64 copy, the precision the algebra folds a run in (a float32 view would be
        # rounded back to float32 after every step of the fold).
        weight = _values(w).astype(np.float64)
        bias = None if b is None else _values(b).astype(np.float64)
        bad = _non_finite(node, ("weight", w_name, weight), ("bias", b_name, bias))
        if bad is not None:
            return bad
        return ConvSpec(
            weight=weight,
            bias=bias,
            stride=tuple(strides),
            dilation=tuple(dilations),
            groups=group,
            pads=pads,
        )

    return LinearOp(node, "conv", x, node.output[0], n, dims[1] * group, dims[0], w.data_type, resolve)


def read_batchnorm(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """Inference ``BatchNormalization``: ``a = scale / sqrt(var + eps)``, a per-channel affine."""
    if len(node.input) != 5 or not node.output:
        return None
    x = node.input[0]
    attrs = _attrs(node)
    if any(node.output[1:]):
        return _refuse(node, "bn", x, Reason.TRAINING_MODE, "has running-statistics outputs (training mode)")
    if attrs.get("training_mode", 0):
        return _refuse(node, "bn", x, Reason.TRAINING_MODE, "training_mode=1 computes batch statistics")
    if env.opset < 7 and not attrs.get("is_test", 0):
        return _refuse(node, "bn", x, Reason.TRAINING_MODE, "is_test=0 computes batch statistics")
    if env.opset < 9 and attrs.get("spatial", 1) == 0:
        return _refuse(node, "bn", x, Reason.UNSUPPORTED, "spatial=0 normalises per element, not per channel")
    params = []
    for name, what in zip(node.input[1:], ("scale", "bias", "mean", "variance")):
        found = _constant(env, name, f"BatchNormalization {what}")
        if isinstance(found, tuple):
            return _refuse(node, "bn", x, *found)
        params.append(found)
    shapes = {tuple(p.dims) for p in params}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return _refuse(
            node, "bn", x, Reason.UNSUPPORTED, f"statistics of shapes {sorted(shapes)} are not per channel"
        )
    channels = int(params[0].dims[0])
    eps = float(attrs.get("epsilon", 1e-5))

    def resolve(ndim: int, c: int) -> ConvSpec | Decline:
        if c != channels:
            return Decline(Reason.CHANNEL_MISMATCH, f"{label(node)} has {channels} channels, its input {c}")
        gamma, beta, mean, var = (_values(p).astype(np.float64) for p in params)
        bad = _non_finite(
            node,
            *(
                (what, p.name, t)
                for what, p, t in zip(("scale", "bias", "mean", "variance"), params, (gamma, beta, mean, var))
            ),
        )
        if bad is not None:
            return bad
        affine = ChannelAffine.from_batchnorm(mean, var, gamma, beta, eps)
        if not (np.isfinite(affine.scale).all() and np.isfinite(affine.shift).all()):
            return Decline(Reason.NON_FINITE, f"{label(node)}: variance + epsilon is not positive")
        return affine_conv(affine, ndim)

    return LinearOp(node, "bn", x, node.output[0], None, channels, channels, None, resolve)


def _affine_reader(op: str) -> Callable[[onnx.NodeProto, Env], LinearOp | None]:
    """``Mul``/``Add``/``Sub``/``Div`` of an activation by a constant: scalar or one per channel."""

    def read(node: onnx.NodeProto, env: Env) -> LinearOp | None:
        if len(node.input) != 2 or len(node.output) != 1:
            return None
        a, b = node.input
        ta, tb = env.tensor(a), env.tensor(b)
        const_a, const_b = not isinstance(ta, str), not isinstance(tb, str)
        if const_a == const_b:
            return None  # two activations (a sum, a product) or two constants
        const, x = (ta, b) if const_a else (tb, a)
        assert not isinstance(const, str)
        if op == "Div" and const_a:
            return None  # c / x is not linear in x
        kind = op.lower()
        if const.data_type not in FLOAT_TYPES:
            if const.data_type in _OTHER_FLOAT_TYPES:
                problem = _type_problem(const, "constant")
                assert problem is not None
                return _refuse(node, kind, x, *problem)
            return None  # integer arithmetic: not a float conv graph
        dims = tuple(int(d) for d in const.dims)

        def resolve(ndim: int, channels: int) -> ConvSpec | Decline:
            rank = ndim + 2
            if len(dims) > rank:
                return Decline(
                    Reason.UNSUPPORTED, f"{label(node)}: constant of shape {list(dims)} has rank over {rank}"
                )
            padded = (1,) * (rank - len(dims)) + dims
            if padded[0] != 1 or any(d != 1 for d in padded[2:]):
                return Decline(
                    Reason.UNSUPPORTED,
                    f"{label(node)}: constant of shape {list(dims)} is not one value per channel "
                    f"of a {rank}D tensor",
                )
            if padded[1] not in (1, channels):
                return Decline(
                    Reason.CHANNEL_MISMATCH,
                    f"{label(node)}: constant has {padded[1]} channels, tensor has {channels}",
                )
            c = np.broadcast_to(_values(const).astype(np.float64).reshape(-1), (channels,)).copy()
            one, zero = np.ones_like(c), np.zeros_like(c)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                scale, shift = {
                    "Mul": (c, zero),
                    "Add": (one, c),
                    "Sub": (-one, c) if const_a else (one, -c),
                    "Div": (1.0 / c, zero),
                }[op]
            if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
                return Decline(
                    Reason.NON_FINITE, f"{label(node)}: constant is not finite (or divides by zero)"
                )
            return affine_conv(ChannelAffine(scale, shift), ndim)

        return LinearOp(node, kind, x, node.output[0], elem_type=const.data_type, resolve=resolve)

    return read


def read_neg(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """``Neg(x)``: the per-channel affine with scale -1 (a subtracted branch)."""
    if len(node.input) != 1 or len(node.output) != 1 or not isinstance(env.tensor(node.input[0]), str):
        return None

    def resolve(ndim: int, channels: int) -> ConvSpec | Decline:
        ones = np.ones(channels, dtype=np.float64)
        return affine_conv(ChannelAffine(-ones, ones * 0), ndim)

    return LinearOp(node, "neg", node.input[0], node.output[0], resolve=resolve)


def read_gemm(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """``Gemm(A, B[, C])`` and ``MatMul(A, B)`` with constant ``B`` (and ``C``): a Linear layer on
    the last dim of ``A``, ``y = alpha * A B' + beta * C`` (``B'`` is ``B`` or its transpose)."""
    if len(node.input) < 2 or len(node.output) != 1 or not isinstance(env.tensor(node.input[0]), str):
        return None
    x, b_name = node.input[0], node.input[1]
    attrs = _attrs(node)
    gemm = node.op_type == "Gemm"
    if gemm and attrs.get("transA", 0):
        return None  # the activation is transposed: not a map of its last dim
    b = _constant(env, b_name, "weight")
    if isinstance(b, tuple):
        return _refuse(node, "linear", x, *b)
    if len(b.dims) != 2:
        return (
            None
            if not gemm
            else _refuse(node, "linear", x, Reason.UNSUPPORTED, f"weight of shape {list(b.dims)}")
        )
    trans_b = bool(attrs.get("transB", 0)) if gemm else False
    k, n = (int(b.dims[1]), int(b.dims[0])) if trans_b else (int(b.dims[0]), int(b.dims[1]))
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    c: onnx.TensorProto | None = None
    c_name = node.input[2] if gemm and len(node.input) > 2 else ""
    if c_name:
        found = _constant(env, c_name, "bias")
        if isinstance(found, tuple):
            return _refuse(node, "linear", x, *found)
        if math.prod(found.dims) not in (1, n) or (len(found.dims) == 2 and found.dims[0] != 1):
            return _refuse(
                node, "linear", x, Reason.UNSUPPORTED, f"bias of shape {list(found.dims)} for {n} outputs"
            )
        c = found

    def resolve(ndim: int, channels: int) -> ConvSpec | Decline:
        if channels != k:
            return Decline(
                Reason.CHANNEL_MISMATCH, f"{label(node)} reads {k} features, its input has {channels}"
            )
        weight = _values(b).astype(np.float64)
        weight = alpha * (weight if trans_b else weight.T)
        bias = None if c is None else beta * np.broadcast_to(_values(c).astype(np.float64).reshape(-1), (n,))
        bad = _non_finite(node, ("weight", b_name, weight), ("bias", c_name, bias))
        return bad if bad is not None else linear_spec(np.ascontiguousarray(weight), bias)

    return LinearOp(node, "linear", x, node.output[0], None, k, n, b.data_type, resolve)


def read_pad(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """Constant-zero ``Pad`` of spatial dims: the identity conv with those pads (folds into a conv)."""
    if not node.input or len(node.output) != 1:
        return None
    x = node.input[0]
    attrs = _attrs(node)
    mode = attrs.get("mode", "constant")
    axes: list[int] | None = None
    if env.opset < 11:
        pads = list(attrs.get("pads", attrs.get("paddings", [])))
        value = float(attrs.get("value", 0.0))
    else:
        if len(node.input) < 2 or not node.input[1]:
            return None
        found = env.tensor(node.input[1])
        if isinstance(found, str):
            return _refuse(node, "pad", x, Reason.NON_CONSTANT, f"pads {node.input[1]!r} are {found}")
        pads = [int(p) for p in numpy_helper.to_array(found).reshape(-1)]
        value = 0.0
        if len(node.input) > 2 and node.input[2]:
            found = env.tensor(node.input[2])
            if isinstance(found, str):
                return _refuse(node, "pad", x, Reason.NON_CONSTANT, f"pad value {node.input[2]!r} is {found}")
            array = numpy_helper.to_array(found).reshape(-1)
            value = float(array[0]) if array.size else 0.0
        if len(node.input) > 3 and node.input[3]:
            found = env.tensor(node.input[3])
            if isinstance(found, str):
                return _refuse(node, "pad", x, Reason.NON_CONSTANT, f"axes {node.input[3]!r} are {found}")
            axes = [int(a) for a in numpy_helper.to_array(found).reshape(-1)]
    if mode != "constant":
        return _refuse(
            node, "pad", x, Reason.PADDING_MODE, f"pads in {mode!r} mode; ONNX Conv pads with zeros only"
        )
    if value != 0.0:
        return _refuse(node, "pad", x, Reason.UNSUPPORTED, f"pads with the value {value:g}, not zero")
    if not pads or len(pads) % 2:
        return None
    if min(pads) < 0:
        return _refuse(node, "pad", x, Reason.UNSUPPORTED, f"negative pads {pads} crop the tensor")
    k = len(pads) // 2
    begins, ends = pads[:k], pads[k:]

    def resolve(ndim: int, channels: int) -> ConvSpec | Decline:
        rank = ndim + 2
        full = [[0, 0] for _ in range(rank)]
        if axes is None and k != rank:
            return Decline(Reason.RANK_MISMATCH, f"{label(node)} pads {k} dims of a {rank}D tensor")
        for axis, b, e in zip(axes if axes is not None else range(k), begins, ends):
            axis = axis + rank if axis < 0 else axis
            if not 0 <= axis < rank:
                return Decline(Reason.RANK_MISMATCH, f"{label(node)} pads axis {axis} of a {rank}D tensor")
            full[axis] = [b, e]
        if any(full[0]) or any(full[1]):
            return Decline(Reason.UNSUPPORTED, f"{label(node)} pads the batch or channel dimension")
        weight = np.ones((channels, 1, *([1] * ndim)))
        return ConvSpec(weight=weight, groups=channels, pads=tuple((b, e) for b, e in full[2:]))

    return LinearOp(node, "pad", x, node.output[0], ndim=k - 2 if axes is None else None, resolve=resolve)


def read_average_pool(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """``AveragePool`` that counts padding (or has none) and floors: a uniform depthwise conv."""
    if not node.input or len(node.output) != 1:
        return None
    x = node.input[0]
    attrs = _attrs(node)
    kernel = [int(k) for k in attrs.get("kernel_shape", [])]
    if not kernel:
        return None
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    problem = _geometry_problem(kernel, strides, dilations)
    if problem is not None:
        return _refuse(node, "avgpool", x, Reason.UNSUPPORTED, problem)
    if attrs.get("ceil_mode", 0):
        return _refuse(
            node, "avgpool", x, Reason.UNSUPPORTED, "ceil_mode=1 windows past the border are not a conv"
        )
    pads = _explicit_pads(attrs, kernel, strides, dilations, env.shape(x))
    if isinstance(pads, str):
        return _refuse(node, "avgpool", x, Reason.UNSUPPORTED, pads)
    if any(b or e for b, e in pads) and not attrs.get("count_include_pad", 0):
        return _refuse(
            node,
            "avgpool",
            x,
            Reason.UNSUPPORTED,
            "count_include_pad=0 averages border windows over fewer inputs",
        )

    def resolve(ndim: int, channels: int) -> ConvSpec | Decline:
        elements = channels * math.prod(kernel)
        if elements > MAX_MERGED_ELEMENTS:
            return Decline(
                Reason.TOO_LARGE,
                f"{label(node)}: kernel {kernel} on {channels} channels would need "
                f"{elements:,} weight elements, over the limit of {MAX_MERGED_ELEMENTS:,}",
            )
        spec = average_pool(channels, kernel, strides, pads, dtype=np.float64)
        return spec.replace(dilation=tuple(dilations))

    return LinearOp(node, "avgpool", x, node.output[0], ndim=n, resolve=resolve)


def read_conv_transpose(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """``ConvTranspose``: :func:`convfuse.frontends.onnx.transpose.read_conv_transpose` (that
    module builds on this one's helpers, so it is imported when first needed)."""
    from .transpose import read_conv_transpose as read

    return read(node, env)


def read_regroup(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """``Reshape`` / ``Flatten`` / ``Squeeze`` / ``Unsqueeze`` that keeps the last dim and only
    regroups the dims before it (:func:`convfuse.ir.regroups`, judged on the inferred shapes of
    its input and output): ``flatten(0, 1)`` of ``[B, N, C]`` exports as ``Flatten(axis=2)``,
    ``reshape_as`` back as ``Reshape`` to a (folded) shape. The identity on a Linear layer's
    features; the planner takes it only into regions of last-dim layers. Any other reshape
    moves or mixes the features and is not read (it ends regions)."""
    if not node.input or len(node.output) != 1 or not isinstance(env.tensor(node.input[0]), str):
        return None
    x, y = node.input[0], node.output[0]
    if not regroups(env.shape(x), env.shape(y)):
        return None

    def resolve(ndim: int, channels: int) -> ConvSpec | Decline:
        return identity(channels, ndim, np.float64)

    return LinearOp(node, "reshape", x, y, resolve=resolve)


#: Op type (default ONNX domain) -> reader. The pattern table of the ONNX front end.
READERS: dict[str, Callable[[onnx.NodeProto, Env], LinearOp | None]] = {
    "Conv": read_conv,
    "ConvTranspose": read_conv_transpose,
    "BatchNormalization": read_batchnorm,
    "Mul": _affine_reader("Mul"),
    "Add": _affine_reader("Add"),
    "Sub": _affine_reader("Sub"),
    "Div": _affine_reader("Div"),
    "Neg": read_neg,
    "Gemm": read_gemm,
    "MatMul": read_gemm,
    "Pad": read_pad,
    "AveragePool": read_average_pool,
    "Reshape": read_regroup,
    "Flatten": read_regroup,
    "Squeeze": read_regroup,
    "Unsqueeze": read_regroup,
}


def read_linear(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """The node as a linear op, a refused one, or ``None`` when it is not of that kind."""
    if node.domain not in ("", "ai.onnx"):
        return None
    reader = READERS.get(node.op_type)
    return None if reader is None else reader(node, env)


#: Convolutions in the ONNX domain that convfuse leaves alone, and why.
_INTEGER_CONVS = {
    "QLinearConv": "a quantized convolution (8-bit integer arithmetic with scales and zero points)",
    "ConvInteger": "an integer convolution",
}


def unread_nodes(nodes: Sequence[onnx.NodeProto]) -> list[tuple[list[onnx.NodeProto], Decline]]:
    """Nodes convfuse does not read although they may hold convolutions: operators outside the
    ONNX domain (``UNSUPPORTED``) and integer or quantized convolutions (``DTYPE``); one decline per
    op type, so that the report says why they were left as they are."""
    groups: dict[tuple[str, str], list[onnx.NodeProto]] = {}
    for node in nodes:
        if node.domain not in ("", "ai.onnx") or node.op_type in _INTEGER_CONVS:
            groups.setdefault((node.domain, node.op_type), []).append(node)
    found = []
    for (domain, op), members in groups.items():
        if domain not in ("", "ai.onnx"):
            decline = Decline(
                Reason.UNSUPPORTED,
                f"{len(members)} {op} node(s) of operator domain {domain!r}: "
                "convfuse reads only the ONNX domain, so these are left as they are "
                "and runs through them are not merged",
            )
        else:
            decline = Decline(
                Reason.DTYPE,
                f"{len(members)} {op} node(s): {_INTEGER_CONVS[op]}; "
                "convfuse merges floating-point Conv only",
            )
        found.append((members, decline))
    return found


# --------------------------------------------------------------------------- writer
def cast_weights(
    weight: np.ndarray, bias: np.ndarray | None, elem_type: int
) -> tuple[np.ndarray, np.ndarray | None] | Decline:
    """Merged weights in the model's type, once; an all-zero bias left out (adding zero is
    exact); a type convfuse does not merge in, or a value the type cannot hold (float16
    overflow), is a decline."""
    dtype = FLOAT_TYPES.get(elem_type)
    if dtype is None:
        return Decline(
            Reason.DTYPE, f"merged weights cannot be written as {onnx.TensorProto.DataType.Name(elem_type)}"
        )
    with np.errstate(over="ignore"):  # float16 overflow is the decline below
        weight = np.ascontiguousarray(weight, dtype=dtype)
        bias = (
            None if bias is None or not bool(np.any(bias != 0)) else np.ascontiguousarray(bias, dtype=dtype)
        )
    if not bool(np.isfinite(weight).all()) or (bias is not None and not bool(np.isfinite(bias).all())):
        return Decline(
            Reason.NON_FINITE, f"merged weights overflow {onnx.TensorProto.DataType.Name(elem_type)}"
        )
    return weight, bias


def weight_inputs(
    x: str,
    weight: np.ndarray,
    bias: np.ndarray | None,
    *,
    name: str,
    elem_type: int,
    fresh: Callable[[str], str],
) -> tuple[list[str], list[NewTensor]]:
    """The inputs ``[x, W(, B)]`` of a node that reads ``weight`` (and ``bias`` unless None) as new
    initializers named after ``name``, and those initializers (already in ``elem_type``)."""
    w_name = fresh(f"{name}.weight")
    initializers = [NewTensor(w_name, weight, elem_type)]
    inputs = [x, w_name]
    if bias is not None:
        b_name = fresh(f"{name}.bias")
        initializers.append(NewTensor(b_name, bias, elem_type))
        inputs.append(b_name)
    return inputs, initializers


def conv_node(
    spec: ConvSpec,
    *,
    name: str,
    x: str,
    y: str,
    elem_type: int,
    fresh: Callable[[str], str],
) -> tuple[onnx.NodeProto, list[NewTensor]] | Decline:
    """One ``Conv`` node computing ``spec`` from ``x`` into ``y``, with explicit pads, and the
    initializers it reads (:class:`NewTensor`: written into the graph by the caller).

    Weights are cast to ``elem_type`` once, here; an all-zero bias is left out (adding zero is
    exact). A weight that does not fit the type (float16 overflow) is a decline.
    """
    if spec.padding_mode != "zeros" and spec.is_padded:
        return Decline(
            Reason.PADDING_MODE, f"merged conv pads in {spec.padding_mode!r} mode; ONNX Conv pads with zeros"
        )
    cast = cast_weights(spec.weight, spec.bias, elem_type)
    if isinstance(cast, Decline):
        return cast
    weight, bias = cast
    inputs, initializers = weight_inputs(x, weight, bias, name=name, elem_type=elem_type, fresh=fresh)
    node = helper.make_node(
        "Conv",
        inputs,
        [y],
        name=name,
        kernel_shape=list(spec.kernel_size),
        strides=list(spec.stride),
        dilations=list(spec.dilation),
        group=spec.groups,
        pads=[b for b, _ in spec.pads] + [e for _, e in spec.pads],
    )
    return node, initializers


@dataclass(frozen=True, eq=False)
class NewTensor:
    """An initializer a merge writes: its values in the model's dtype, not yet in protobuf."""

    name: str
    array: np.ndarray
    elem_type: int

    def write(self, initializers: Any) -> None:
        """Append to ``graph.initializer``, built in place: protobuf copies a message on append."""
        tensor = initializers.add()
        tensor.name = self.name
        tensor.data_type = self.elem_type
        tensor.dims.extend(self.array.shape)
        tensor.raw_data = self.array.astype(self.array.dtype.newbyteorder("<"), copy=False).tobytes()


def linear_nodes(
    spec: ConvSpec,
    *,
    name: str,
    x: str,
    y: str,
    elem_type: int,
    fresh: Callable[[str], str],
    rank2: bool,
) -> tuple[list[onnx.NodeProto], list[NewTensor]] | Decline:
    """A Linear layer on the last dim of ``x``: ``Gemm`` (transB=1) on a ``[N, C]`` tensor,
    ``MatMul`` then ``Add`` on any other rank."""
    cast = cast_weights(*as_matrix(spec), elem_type)
    if isinstance(cast, Decline):
        return cast
    weight, bias = cast
    if rank2:
        inputs, inits = weight_inputs(x, weight, bias, name=name, elem_type=elem_type, fresh=fresh)
        return [helper.make_node("Gemm", inputs, [y], name=name, transB=1)], inits
    weight_t = np.ascontiguousarray(weight.T)
    inputs, inits = weight_inputs(x, weight_t, bias, name=name, elem_type=elem_type, fresh=fresh)
    if bias is None:
        return [helper.make_node("MatMul", inputs, [y], name=name)], inits
    mid = fresh(f"{y}/matmul")
    nodes = [
        helper.make_node("MatMul", inputs[:2], [mid], name=name),
        helper.make_node("Add", [mid, inputs[2]], [y], name=fresh(f"{name}/bias")),
    ]
    return nodes, inits


def mark_merged(node: onnx.NodeProto, detail: str, sources: Sequence[onnx.NodeProto]) -> None:
    """Record on the merged ``node`` the merge kind and the original nodes it replaces, in its
    ``metadata_props`` and ``doc_string`` (:mod:`convfuse.provenance`). A source that is itself
    a merged node contributes the nodes it replaced."""
    pairs: list[tuple[str, str]] = []
    for source in sources:
        earlier = merged_from(source)
        pairs += earlier.sources if earlier is not None else [(label(source), source.op_type)]
    provenance = Provenance(detail, tuple(dict.fromkeys(pairs)))
    props = provenance.properties()
    kept = [(e.key, e.value) for e in node.metadata_props if e.key not in props]
    del node.metadata_props[:]
    for key, value in [*kept, *props.items()]:
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    node.doc_string = describe(provenance)


def merged_from(node: onnx.NodeProto) -> Provenance | None:
    """What :func:`mark_merged` recorded on ``node``, or ``None`` for a node convfuse did not write."""
    return Provenance.from_properties({e.key: e.value for e in node.metadata_props})


def conv_macs(weight_dims: Sequence[int], out_dims: Dims | None) -> int | None:
    """Multiply-accumulates of one Conv per sample: ``Co * Ci/g * prod(k) * prod(output spatial)``."""
    if out_dims is None or len(out_dims) != len(weight_dims) or any(d is None for d in out_dims[2:]):
        return None
    spatial = [d for d in out_dims[2:] if d is not None]
    return math.prod(weight_dims) * math.prod(spatial)
