"""ONNX ``ConvTranspose`` attributes to and from :class:`~convfuse.transpose.ConvTransposeSpec`.

numpy and onnx only. Every form of the padding resolves to explicit ``(begin, end)`` crops plus
``output_padding``, following the operator definition (opset 11+), checked against ONNX Runtime:

- ``NOTSET``: ``pads`` (begins then ends);  ``VALID``: no crop;
- ``SAME_UPPER`` / ``SAME_LOWER``: output ``n * s``, so the total crop is
  ``op + d*(k-1) + 1 - s`` (independent of ``n``); the odd element at the end for UPPER, at the
  beginning for LOWER;
- ``output_shape`` (``pads`` ignored): total ``s*(n-1) + op + d*(k-1) + 1 - out``, which needs a
  static input size; split as above, with ``NOTSET`` and ``VALID`` splitting as LOWER.

A negative total (an output larger than the full transposed output) is declined: ONNX Runtime
and the ONNX reference disagree there (one pads, the other does not).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import helper

from ...decline import Decline, Reason
from ...spec import InvalidSpecError
from ...transpose import ConvTransposeSpec
from .io import node_attributes
from .nodes import (
    Env,
    LinearOp,
    NewTensor,
    _constant,
    _non_finite,
    _refuse,
    _values,
    cast_weights,
    weight_inputs,
)

__all__ = [
    "read_conv_transpose",
    "transpose_from_attributes",
    "transpose_from_node",
    "transpose_node",
]


def _split(total: int, extra_at_end: bool) -> tuple[int, int]:
    small = total // 2
    return (small, total - small) if extra_at_end else (total - small, small)


def transpose_from_attributes(
    weight: np.ndarray,
    bias: np.ndarray | None,
    attrs: Mapping[str, Any],
    x_spatial: Sequence[int | None] | None = None,
) -> ConvTransposeSpec | Decline:
    """The spec of ``ConvTranspose(X, weight[, bias])`` with ``attrs``, or why it cannot be read.

    ``x_spatial`` is the input's spatial size where static; only ``output_shape`` needs it.
    """

    def refuse(message: str) -> Decline:
        return Decline(Reason.UNSUPPORTED, f"ConvTranspose {message}")

    if not 3 <= weight.ndim <= 5:
        return refuse(f"weight of shape {list(weight.shape)} is not 1D, 2D or 3D")
    n = weight.ndim - 2
    kernel = [int(k) for k in weight.shape[2:]]
    if list(attrs.get("kernel_shape", kernel)) != kernel:
        return refuse(
            f"kernel_shape {list(attrs['kernel_shape'])} does not match weight {list(weight.shape)}"
        )
    strides = [int(s) for s in attrs.get("strides", [1] * n)]
    dilations = [int(d) for d in attrs.get("dilations", [1] * n)]
    output_padding = [int(p) for p in attrs.get("output_padding", [0] * n)]
    if not len(strides) == len(dilations) == len(output_padding) == n:
        return refuse(
            f"strides {strides}, dilations {dilations} or output_padding {output_padding} are not {n}D"
        )
    if min(strides) < 1 or min(dilations) < 1 or min(output_padding) < 0:
        return refuse(
            f"has strides {strides}, dilations {dilations}, output_padding {output_padding} out of range"
        )
    auto_pad = attrs.get("auto_pad", "NOTSET") or "NOTSET"
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        return refuse(f"has unknown auto_pad {auto_pad!r}")
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    output_shape = [int(v) for v in attrs.get("output_shape", [])]
    if output_shape:
        output_shape = output_shape[-n:]  # exporters write spatial dims, sometimes the full shape
        if len(output_shape) != n:
            return refuse(f"output_shape {list(attrs['output_shape'])} is not {n}D")
        if x_spatial is None or len(x_spatial) != n or any(v is None or v < 1 for v in x_spatial):
            return refuse(
                f"output_shape {output_shape} sets its pads from the input size, which is not static here"
            )
        sizes = [v for v in x_spatial if v is not None]  # all of them: checked just above
        totals = [
            s * (size - 1) + op + x - out
            for s, size, op, x, out in zip(strides, sizes, output_padding, extents, output_shape)
        ]
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        totals = [op + x - s for op, x, s in zip(output_padding, extents, strides)]
    elif auto_pad == "VALID":
        totals = None
        pads = ((0, 0),) * n
    else:
        totals = None
        flat = [int(p) for p in attrs.get("pads", [0] * 2 * n)]
        if len(flat) != 2 * n or min(flat) < 0:
            return refuse(f"pads {flat} are not {2 * n} non-negative values")
        pads = tuple((flat[i], flat[i + n]) for i in range(n))
    if totals is not None:
        if min(totals) < 0:
            return refuse(
                f"asks for an output larger than its full transposed output (total padding {totals}); "
                "ONNX Runtime and the ONNX reference disagree on that"
            )
        pads = tuple(_split(total, auto_pad == "SAME_UPPER") for total in totals)
    try:
        return ConvTransposeSpec(
            weight=weight,
            bias=bias,
            stride=tuple(strides),
            dilation=tuple(dilations),
            groups=int(attrs.get("group", 1)),
            pads=pads,
            output_padding=tuple(output_padding),
        )
    except InvalidSpecError as exc:
        return refuse(str(exc))


def transpose_from_node(
    node: onnx.NodeProto,
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    x_spatial: Sequence[int | None] | None = None,
) -> ConvTransposeSpec | Decline:
    """:func:`transpose_from_attributes` on a ``ConvTranspose`` node's own attributes."""
    return transpose_from_attributes(weight, bias, node_attributes(node), x_spatial)


def transpose_node(
    spec: ConvTransposeSpec,
    *,
    name: str,
    x: str,
    y: str,
    elem_type: int,
    fresh: Callable[[str], str],
) -> tuple[onnx.NodeProto, list[NewTensor]] | Decline:
    """One ``ConvTranspose`` node computing ``spec`` from ``x`` into ``y``, and the initializers it
    reads in ``elem_type`` (:class:`NewTensor`, as :func:`conv_node`); an all-zero bias is left out.

    Only ``pe - op`` matters, so the end is written as ``pads`` end ``max(pe - op, 0)`` and
    ``output_padding`` ``max(op - pe, 0)``. ONNX Runtime (1.32, CPU) refuses ``output_padding >=
    stride`` even where dilation is larger; a spec that needs that is declined.
    """
    ends = [e - op for (_, e), op in zip(spec.pads, spec.output_padding)]
    output_padding = [max(-e, 0) for e in ends]
    if any(op >= s for op, s in zip(output_padding, spec.stride)):
        return Decline(
            Reason.UNSUPPORTED,
            f"{spec!r} extends its output by {output_padding}; ONNX Runtime needs output_padding below the "
            f"stride {spec.stride}",
        )
    cast = cast_weights(spec.weight, spec.bias, elem_type)
    if isinstance(cast, Decline):
        return cast
    weight, bias = cast
    inputs, initializers = weight_inputs(x, weight, bias, name=name, elem_type=elem_type, fresh=fresh)
    node = helper.make_node(
        "ConvTranspose",
        inputs,
        [y],
        name=name,
        kernel_shape=list(spec.kernel_size),
        strides=list(spec.stride),
        dilations=list(spec.dilation),
        group=spec.groups,
        pads=[b for b, _ in spec.pads] + [max(e, 0) for e in ends],
        output_padding=output_padding,
    )
    return node, initializers


def read_conv_transpose(node: onnx.NodeProto, env: Env) -> LinearOp | None:
    """``ConvTranspose(X, W[, B])`` with constant ``W`` and ``B``, 1D to 3D, every ``auto_pad``
    form and ``output_shape`` (which needs the input size static), as a :class:`LinearOp` of kind
    ``"convtranspose"`` whose spec is a :class:`~convfuse.transpose.ConvTransposeSpec`.

    The attributes are read here, on a shape-only weight (any refusal is known before planning);
    the weights are read, in float64, when the planner asks for the spec."""
    if len(node.input) < 2 or len(node.output) != 1:
        return None
    kind = "convtranspose"
    x, w_name = node.input[0], node.input[1]
    b_name = node.input[2] if len(node.input) > 2 else ""
    w = _constant(env, w_name, "weight")
    if isinstance(w, tuple):
        return _refuse(node, kind, x, *w)
    dims = [int(d) for d in w.dims]
    b: onnx.TensorProto | None = None
    if b_name:
        found = _constant(env, b_name, "bias")
        if isinstance(found, tuple):
            return _refuse(node, kind, x, *found)
        b = found
    x_shape = env.shape(x)
    x_spatial = None if x_shape is None or len(x_shape) != len(dims) else list(x_shape[2:])
    attrs = node_attributes(node)
    shaped = np.broadcast_to(np.zeros((), dtype=np.float64), dims)  # the attributes, checked on shapes
    bias_shape = (
        None if b is None else np.broadcast_to(np.zeros((), dtype=np.float64), [int(d) for d in b.dims])
    )
    checked = transpose_from_attributes(shaped, bias_shape, attrs, x_spatial)
    if isinstance(checked, Decline):
        return _refuse(node, kind, x, checked.reason, checked.message)

    def resolve(ndim: int, channels: int) -> ConvTransposeSpec | Decline:
        weight = _values(w).astype(np.float64)
        bias = None if b is None else _values(b).astype(np.float64)
        bad = _non_finite(node, ("weight", w_name, weight), ("bias", b_name, bias))
        if bad is not None:
            return bad
        return checked.replace(weight=weight, bias=bias)

    return LinearOp(
        node,
        kind,
        x,
        node.output[0],
        checked.ndim,
        checked.in_channels,
        checked.out_channels,
        w.data_type,
        resolve,
    )
