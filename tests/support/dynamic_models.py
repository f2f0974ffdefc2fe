"""Small ONNX models with symbolic batch and spatial dims, as exporters write them, for the size
derivation tests. Each names the sizes the verifier must choose (worked out by hand in its docstring)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from tests.support.onnx_builders import IR_FOR_OPSET, Graph

C = 4


def strided_dilated_2d() -> onnx.ModelProto:
    """x[N,4,H,W] -> conv 3x3 pad 1 + BN -> conv 3x3 stride 2 pad 1 -> conv (3,2) dilation 2 ->
    MaxPool 3x3 stride 2. The pool needs 3, so the dilated conv (extent 5 x 3) needs 7 x 5 and the
    strided conv's input 13 x 9: sizes 13x9, then 14x10 (other parity, every tap covered)."""
    g = Graph(["N", C, "H", "W"])
    y = g.bn(g.conv("x", C, C, 3, pads=[1, 1, 1, 1]), C)
    y = g.conv(y, C, C, 3, strides=[2, 2], pads=[1, 1, 1, 1])
    y = g.conv(y, C, C, (3, 2), dilations=[2, 2])
    return g.model([g.node("MaxPool", [y], kernel_shape=[3, 3], strides=[2, 2])])


def pooled_1d() -> onnx.ModelProto:
    """x[N,4,L] -> conv 5 stride 2 -> conv 3 dilation 3 pads (2, 1) -> AveragePool 4 stride 4,
    ceil_mode. The pool needs 1 (ceil mode), the dilated conv (extent 7, padded 3) 4, the first
    conv 11: sizes 11, then 18, the first even size at which the dilated conv sees 7 and the pool 4."""
    g = Graph(["N", C, "L"])
    y = g.conv("x", C, C, 5, strides=[2])
    y = g.conv(y, C, C, 3, dilations=[3], pads=[2, 1])
    y = g.node("Relu", [y])
    return g.model([g.node("AveragePool", [y], kernel_shape=[4], strides=[4], ceil_mode=1)])


def pooled_3d() -> onnx.ModelProto:
    """x[N,2,D,H,W] -> conv 3x3x3 pad 1 -> conv (1,3,3) stride (1,2,2) -> MaxPool 2x2x2 stride 2.
    D: the pool needs 2 (sizes 2, 3); H, W: the strided conv must give 2, so 5 (sizes 5, 6)."""
    g = Graph(["N", 2, "D", "H", "W"])
    y = g.conv("x", 2, C, 3, pads=[1] * 6)
    y = g.conv(y, C, C, (1, 3, 3), strides=[1, 2, 2])
    return g.model([g.node("MaxPool", [y], kernel_shape=[2, 2, 2], strides=[2, 2, 2])])


def fixed_width_reshape() -> onnx.ModelProto:
    """x[N,4,H,W] -> conv 3x3 pad 1 + BN -> Reshape [0, 0, -1, 8] (rows of a fixed width 8).
    H: any size, every tap covered from 3: sizes 1, 4; W: a multiple of 8: sizes 8, 16 (no odd W)."""
    g = Graph(["N", C, "H", "W"])
    y = g.bn(g.conv("x", C, C, 3, pads=[1, 1, 1, 1]), C)
    shape = g.const(np.array([0, 0, -1, 8]), "shape", np.int64)
    return g.model([g.node("Reshape", [y, shape])])


def odd_border(naive: bool = False) -> onnx.ModelProto:
    """Two heads on x[N,4,H,W]: y = conv 2x2 stride 2 pads (0, 1) of a biased 1x1 conv, and
    z = AveragePool 4x4 stride 4 (which needs 4). Sizes 4 and 5.

    The 2x2 stride-2 conv reads its end padding only at odd sizes. ``naive=True`` merges the two
    convs into one as if padding were transparent (DESIGN case 2 done wrong): the merged conv
    pads x, where the original padded the 1x1 conv's output, so at odd sizes its last row and
    column add the 1x1 bias through the padding taps. Right at 4, wrong at 5."""
    g = Graph(["N", C, "H", "W"], seed=3)
    rng = np.random.default_rng(7)
    wa, ba = rng.standard_normal((C, C, 1, 1)), rng.standard_normal(C)
    wb, bb = rng.standard_normal((C, C, 2, 2)) / 4, rng.standard_normal(C)
    pads = [0, 0, 1, 1]
    if naive:
        w = np.einsum("ocij,ck->okij", wb, wa[:, :, 0, 0])
        b = bb + np.einsum("ocij,c->o", wb, ba)
        y = g.node("Conv", ["x", g.const(w, "w"), g.const(b, "b")], name="head", strides=[2, 2], pads=pads)
    else:
        a = g.node("Conv", ["x", g.const(wa, "w"), g.const(ba, "b")])
        y = g.node("Conv", [a, g.const(wb, "w"), g.const(bb, "b")], name="head", strides=[2, 2], pads=pads)
    z = g.node("AveragePool", ["x"], name="pool", kernel_shape=[4, 4], strides=[4, 4])
    return g.model([y, z])


def fixed_head(size: int = 5) -> onnx.ModelProto:
    """x[N,3,H,W] -> conv 3x3 pad 1 -> Flatten -> Gemm with 3*size*size inputs: it runs at
    H = W = size only, a constraint the geometry walk does not see (it stops at Flatten), and
    the sizes tried (1, 2, 3, 4, 8, 16, 32, 64) miss 5: the reference cannot be run."""
    g = Graph(["N", 3, "H", "W"])
    y = g.node("Flatten", [g.conv("x", 3, 3, 3, pads=[1, 1, 1, 1])], axis=1)
    w = g.const(g.rng.standard_normal((3 * size * size, 2)), "fc")
    out = g.node("Gemm", [y, w])
    graph = helper.make_graph(
        g.nodes, "g", g.inputs, [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 2])], g.inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_FOR_OPSET[17])
    onnx.checker.check_model(model, full_check=True)
    return model
