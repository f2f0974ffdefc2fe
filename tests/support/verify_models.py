"""Small ONNX models for the verifier tests, built with onnx.helper (float32 Conv graphs mostly)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 11; onnx 1.23 writes newer by default


def model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    initializers: Sequence[onnx.TensorProto] = (),
    name: str = "g",
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(m)
    return m


def conv_weights(seed: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Float32 weights, fan-in scaled so activations stay near unit scale."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) / np.sqrt(np.prod(s[1:]))).astype(np.float32) for s in shapes]


def conv_node(name: str, x: str, out: str, pads: int, bias: bool = True) -> onnx.NodeProto:
    inputs = [x, f"{name}.w"] + ([f"{name}.b"] if bias else [])
    return helper.make_node("Conv", inputs, [out], name=name, pads=[pads] * 4)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def f32(name: str, dims: Sequence[int | str | None] | None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


# --------------------------------------------------------------------------- a padded chain
CHANNELS = (3, 8, 6)
SIZE = 16


def chain_params(seed: int = 0) -> dict[str, np.ndarray]:
    """conv1 3x3 (3->8) then conv2 3x3 (8->6), both with bias."""
    c0, c1, c2 = CHANNELS
    w1, w2 = conv_weights(seed, [(c1, c0, 3, 3), (c2, c1, 3, 3)])
    rng = np.random.default_rng(seed + 100)
    return {
        "conv1.w": w1,
        "conv1.b": (0.1 * rng.standard_normal(c1)).astype(np.float32),
        "conv2.w": w2,
        "conv2.b": (0.1 * rng.standard_normal(c2)).astype(np.float32),
    }


Params = dict[str, np.ndarray]


def padded_chain(params: Params | None = None, dims: Sequence[int | str] | None = None) -> onnx.ModelProto:
    """Reference: x -> conv1 (3x3, pad 1) -> t -> conv2 (3x3, pad 1) -> y."""
    p = chain_params() if params is None else params
    dims = [1, CHANNELS[0], SIZE, SIZE] if dims is None else dims
    return model(
        [conv_node("conv1", "x", "t", 1), conv_node("conv2", "t", "y", 1)],
        [f32("x", dims)],
        [f32("y", [dims[0], CHANNELS[2], *dims[2:]])],
        [init(k, v) for k, v in p.items()],
        name="chain",
    )


def composed_kernel(params: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The 5x5 kernel and bias of conv2 after conv1, computed in float64 with torch.

    Both convs are correlations, so their composition correlates with the *full convolution* of
    the taps: ``C[o, i] = sum_c fullconv(W1[c, i], W2[o, c])`` (conv2d of ``W1^T`` with the
    spatially flipped ``W2``, padding 2); bias ``b2 + sum_{c,j} W2[o, c, j] * b1[c]``.
    """
    w1 = torch.from_numpy(params["conv1.w"]).double()
    w2 = torch.from_numpy(params["conv2.w"]).double()
    b1 = torch.from_numpy(params["conv1.b"]).double()
    b2 = torch.from_numpy(params["conv2.b"]).double()
    w = F.conv2d(w1.transpose(0, 1), w2.flip(-1, -2), padding=2).transpose(0, 1)
    b = b2 + w2.sum(dim=(2, 3)) @ b1
    return w.float().numpy(), b.float().numpy()


def naive_merge(params: Params | None = None, dims: Sequence[int | str] | None = None) -> onnx.ModelProto:
    """Candidate: one 5x5 conv with pad 2: right in the interior, wrong on a 1-pixel border ring."""
    p = chain_params() if params is None else params
    w, b = composed_kernel(p)
    dims = [1, CHANNELS[0], SIZE, SIZE] if dims is None else dims
    return model(
        [conv_node("merged", "x", "y", 2)],
        [f32("x", dims)],
        [f32("y", [dims[0], CHANNELS[2], *dims[2:]])],
        [init("merged.w", w), init("merged.b", b)],
        name="merged",
    )


def perturbed(params: dict[str, np.ndarray], key: str, relative: float) -> dict[str, np.ndarray]:
    """A copy of ``params`` with the largest element of ``key`` scaled by ``1 + relative``."""
    out = {k: v.copy() for k, v in params.items()}
    flat = out[key].reshape(-1)
    i = int(np.argmax(np.abs(flat)))
    flat[i] = np.float32(flat[i] * (1 + relative))
    return out


def unpadded_chain(params: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """conv1 (3x3, pad 1) then conv2 (3x3, no padding): exactly one 5x5 conv with pad 1."""
    p = chain_params() if params is None else params
    return model(
        [conv_node("conv1", "x", "t", 1), conv_node("conv2", "t", "y", 0)],
        [f32("x", [1, CHANNELS[0], SIZE, SIZE])],
        [f32("y", [1, CHANNELS[2], SIZE - 2, SIZE - 2])],
        [init(k, v) for k, v in p.items()],
        name="unpadded",
    )


def exact_merge(params: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """The exact merge of :func:`unpadded_chain`: one 5x5 conv with pad 1."""
    p = chain_params() if params is None else params
    w, b = composed_kernel(p)
    return model(
        [conv_node("merged", "x", "y", 1)],
        [f32("x", [1, CHANNELS[0], SIZE, SIZE])],
        [f32("y", [1, CHANNELS[2], SIZE - 2, SIZE - 2])],
        [init("merged.w", w), init("merged.b", b)],
        name="unpadded-merged",
    )


# --------------------------------------------------------------------------- two regions
def two_regions(
    merge_first: str | None = None, merge_second: str | None = None, seed: int = 1
) -> onnx.ModelProto:
    """x -> conv1, conv2 (3x3 pad 1 each) -> 'b' -> Relu -> 'r' -> conv3, conv4 (1x1) -> 'y'.

    ``merge_first``: None keeps conv1/conv2, ``"naive"`` replaces them with one 5x5 pad-2 conv
    named ``merged_a`` (border wrong). ``merge_second``: None keeps conv3/conv4, ``"exact"`` or
    ``"perturbed"`` replaces them with one 1x1 conv ``merged_b`` (exact, or one weight off by 1e-3).
    """
    c0, c1, c2, c3 = 3, 6, 6, 4
    w1, w2, w3, w4 = conv_weights(seed, [(c1, c0, 3, 3), (c2, c1, 3, 3), (8, c2, 1, 1), (c3, 8, 1, 1)])
    rng = np.random.default_rng(seed + 7)
    sizes = [("1", c1), ("2", c2), ("3", 8), ("4", c3)]
    b = {n: (0.1 * rng.standard_normal(c)).astype(np.float32) for n, c in sizes}
    nodes, inits = [], []
    if merge_first is None:
        nodes += [conv_node("conv1", "x", "a", 1), conv_node("conv2", "a", "b", 1)]
        inits += [init("conv1.w", w1), init("conv1.b", b["1"]), init("conv2.w", w2), init("conv2.b", b["2"])]
    else:
        w, bias = composed_kernel({"conv1.w": w1, "conv1.b": b["1"], "conv2.w": w2, "conv2.b": b["2"]})
        nodes.append(conv_node("merged_a", "x", "b", 2))
        inits += [init("merged_a.w", w), init("merged_a.b", bias)]
    nodes.append(helper.make_node("Relu", ["b"], ["r"], name="relu"))
    if merge_second is None:
        nodes += [conv_node("conv3", "r", "c", 0), conv_node("conv4", "c", "y", 0)]
        inits += [init("conv3.w", w3), init("conv3.b", b["3"]), init("conv4.w", w4), init("conv4.b", b["4"])]
    else:
        w = np.einsum("oc,ci->oi", w4[:, :, 0, 0].astype(np.float64), w3[:, :, 0, 0].astype(np.float64))
        bias = b["4"].astype(np.float64) + w4[:, :, 0, 0].astype(np.float64) @ b["3"].astype(np.float64)
        w = w.astype(np.float32)[:, :, None, None]
        if merge_second == "perturbed":
            i = np.unravel_index(np.argmax(np.abs(w)), w.shape)
            w[i] *= np.float32(1 + 1e-3)
        nodes.append(conv_node("merged_b", "r", "y", 0))
        inits += [init("merged_b.w", w), init("merged_b.b", bias.astype(np.float32))]
    x, y = f32("x", [1, c0, SIZE, SIZE]), f32("y", [1, c3, SIZE, SIZE])
    return model(nodes, [x], [y], inits, name="two-regions")


# --------------------------------------------------------------------------- several inputs and outputs
def multi_io(shift: float = 0.0, flip_argmax: bool = False, reorder: bool = False) -> onnx.ModelProto:
    """Inputs x (float, 1x3x8x8), s (float, 1x4x8x8), k (int64, 1x4x8x8), m (bool, 1x4x8x8).

    Outputs: y = Conv(x) + s + float(k) + offset (``shift`` in channel 0 of offset),
    z = Where(m, Relu(Conv(x)), 0), idx = ArgMax(y, axis 1) (int64; ``flip_argmax`` takes ArgMin instead).
    ``reorder`` lists the outputs in another order (names unchanged).
    """
    (w,) = conv_weights(3, [(4, 3, 3, 3)])
    offset = np.zeros((4, 1, 1), np.float32)
    offset[0] += shift
    nodes = [
        conv_node("conv", "x", "cx", 1),
        helper.make_node("Cast", ["k"], ["kf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Add", ["cx", "s"], ["cs"], name="add_s"),
        helper.make_node("Add", ["cs", "kf"], ["ck"], name="add_k"),
        helper.make_node("Add", ["ck", "offset"], ["y"], name="add_offset"),
        helper.make_node("Relu", ["cx"], ["rx"], name="relu"),
        helper.make_node("Where", ["m", "rx", "zero"], ["z"], name="where"),
        helper.make_node(
            "ArgMin" if flip_argmax else "ArgMax", ["y"], ["idx"], axis=1, keepdims=0, name="argmax"
        ),
    ]
    dims = [1, 4, 8, 8]
    outputs = [
        f32("y", dims),
        f32("z", dims),
        helper.make_tensor_value_info("idx", TensorProto.INT64, [1, 8, 8]),
    ]
    if reorder:
        outputs = outputs[::-1]
    return model(
        nodes,
        [
            f32("x", [1, 3, 8, 8]),
            f32("s", dims),
            helper.make_tensor_value_info("k", TensorProto.INT64, dims),
            helper.make_tensor_value_info("m", TensorProto.BOOL, dims),
        ],
        outputs,
        [
            init("conv.w", w),
            init("conv.b", np.zeros(4, np.float32)),
            init("offset", offset),
            init("zero", np.zeros((), np.float32)),
        ],
        name="multi-io",
    )


# --------------------------------------------------------------------------- other dtypes
def elementwise(elem_type: int, scale: float = 2.0) -> onnx.ModelProto:
    """y = x * scale + x (float16/32/64); bfloat16 goes through float32 (ORT has no bf16 math on CPU)."""
    nodes, inits = [], []
    if elem_type == TensorProto.BFLOAT16:
        nodes += [
            helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["xf", "scale"], ["m"]),
            helper.make_node("Add", ["m", "xf"], ["yf"]),
            helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16),
        ]
        inits.append(init("scale", np.array(scale, np.float32)))
    else:
        dtype = helper.tensor_dtype_to_np_dtype(elem_type)
        nodes += [helper.make_node("Mul", ["x", "scale"], ["m"]), helper.make_node("Add", ["m", "x"], ["y"])]
        inits.append(init("scale", np.array(scale, dtype)))
    dims = [1, 2, 4, 4]
    return model(
        nodes,
        [helper.make_tensor_value_info("x", elem_type, dims)],
        [helper.make_tensor_value_info("y", elem_type, dims)],
        inits,
        name=f"elementwise-{elem_type}",
    )


def fp16_chain(merged: bool = False) -> onnx.ModelProto:
    """:func:`unpadded_chain` (or its exact merge) in float16 throughout."""
    p = chain_params()
    m = exact_merge(p) if merged else unpadded_chain(p)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(m)
    return m


def scaled_conv(scale_shape: Sequence[int] = ()) -> onnx.ModelProto:
    """y = Conv(x) * g with a second input ``g`` of shape ``scale_shape`` (rank 0 by default)."""
    (w,) = conv_weights(5, [(4, 3, 3, 3)])
    return model(
        [
            conv_node("conv", "x", "c", 1, bias=False),
            helper.make_node("Mul", ["c", "g"], ["y"], name="scale"),
        ],
        [f32("x", [1, 3, 8, 8]), f32("g", list(scale_shape))],
        [f32("y", [1, 4, 8, 8])],
        [init("conv.w", w)],
        name="scaled",
    )


def deep_chain(
    layers: int = 8, perturb: int | None = None, channels: int = 16, factor: float = 1.001
) -> onnx.ModelProto:
    """``layers`` x (conv 3x3 pad 1, Relu); ``perturb`` scales the largest weight of that conv by
    ``factor``."""
    rng = np.random.default_rng(11)
    nodes, inits, prev = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((channels, 3 if i == 0 else channels, 3, 3)) / np.sqrt(9 * channels)).astype(
            np.float32
        )
        if perturb == i:
            w.reshape(-1)[np.argmax(np.abs(w))] *= np.float32(factor)
        inits.append(init(f"conv{i}.w", w))
        nodes.append(conv_node(f"conv{i}", prev, f"c{i}", 1, bias=False))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        prev = f"r{i}"
    return model(
        nodes, [f32("x", [1, 3, SIZE, SIZE])], [f32(prev, [1, channels, SIZE, SIZE])], inits, name="deep"
    )


def bf16_region(scale: float = 2.0, leaky: bool = False) -> onnx.ModelProto:
    """bfloat16 in and out: x -> Cast -> Mul 'm' -> Cast bf16 'h' -> Cast -> Relu 'r' -> Cast bf16 'y'.

    ``leaky``: a LeakyRelu instead of the Relu, and the float copy of 'h' renamed, so the wrong
    region reads the bfloat16 tensor 'h' directly.
    """
    hf = "hf_renamed" if leaky else "hf"
    act = (
        helper.make_node("LeakyRelu", [hf], ["r"], alpha=0.5, name="act")
        if leaky
        else helper.make_node("Relu", [hf], ["r"], name="act")
    )
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT, name="cast_in"),
        helper.make_node("Mul", ["xf", "scale"], ["m"], name="mul"),
        helper.make_node("Cast", ["m"], ["h"], to=TensorProto.BFLOAT16, name="cast_h"),
        helper.make_node("Cast", ["h"], [hf], to=TensorProto.FLOAT, name="cast_hf"),
        act,
        helper.make_node("Cast", ["r"], ["y"], to=TensorProto.BFLOAT16, name="cast_out"),
    ]
    dims = [1, 2, 6, 6]
    return model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, dims)],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, dims)],
        [init("scale", np.array(scale, np.float32))],
        name="bf16-region",
    )
