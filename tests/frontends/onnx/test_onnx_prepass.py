"""ONNX pre-passes of issue 16: constant folding and bias-filled borders read as zero pads.

The SR block is exported by torch (TorchScript exporter, ``do_constant_folding=False``, static
size) from code written as public SR code writes it (:mod:`tests.support.sr_models`); the other cases are
built by hand. Each positive case has a twin that must stay as it is.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

import convfuse
from convfuse.decline import Reason
from convfuse.frontends.onnx.fold import MAX_FOLDED_ELEMENTS, fold_constants
from convfuse.report import MergeKind
from tests.support.onnx_builders import Graph, check_fused, fuse_checked, ops, reasons

torch = pytest.importorskip("torch")
sr = pytest.importorskip("tests.support.sr_models")

#: Ops of shape machinery and of the border writes, none of which may survive the pre-passes.
_SHAPE_OPS = {
    "Shape",
    "Gather",
    "Range",
    "ConstantOfShape",
    "Expand",
    "Slice",
    "Concat",
    "Unsqueeze",
    "Squeeze",
    "Cast",
    "Reshape",
    "Where",
    "Equal",
    "Constant",
    "ScatterND",
    "Transpose",
    "Mul",
    "Sub",
}


def _export(module: torch.nn.Module, shape: tuple[int, ...] = (1, 4, 8, 8)) -> onnx.ModelProto:
    torch.manual_seed(0)
    try:
        return sr.export(module, shape)
    except Exception as exc:  # an exporter this torch does not have, or one that cannot export it
        pytest.skip(f"torch.onnx.export failed on this torch: {' '.join(str(exc).split())[:200]}")


def _counts(model: onnx.ModelProto) -> str:
    c = ops(model)
    return ", ".join(f"{op} {c[op]}" for op in ("Conv", "Add", "ScatterND", "Pad"))


@pytest.mark.parametrize("layer", ["conv", "bn"])
def test_sr_block_folds_shapes_and_reads_borders_as_pads(layer: str) -> None:
    torch.manual_seed(0)
    model = _export(sr.SRBlock(4, layer=layer))
    before = ops(model)
    assert before["ScatterND"] == 16 and before["Shape"] > 0
    fused, report = fuse_checked(model, tol=1e-5)
    after = ops(fused)
    print(f"\n{layer}: before {_counts(model)} ({sum(before.values())} nodes); after {_counts(fused)}")
    assert not set(after) & _SHAPE_OPS, after
    kinds = report.merge_counts()
    assert kinds[MergeKind.BORDER] == 4 and kinds[MergeKind.FOLD] > 0
    # What the pre-passes guarantee: nothing but convs, zero pads and the sum are left ...
    assert set(after) <= {"Conv", "Pad", "Add", "BatchNormalization"}
    # ... and today's planner merges the whole block (the zero pads became conv padding).
    assert after == Counter({"Conv": 1})


def test_border_filled_with_another_value_is_kept() -> None:
    torch.manual_seed(0)
    model = _export(sr.SRBlock(4, fill=0.25))
    fused, report = fuse_checked(model, tol=1e-5)
    print(f"\nfill=0.25: after {_counts(fused)}")
    assert Reason.BORDER_VALUE in reasons(report)
    assert ops(fused)["ScatterND"] == 16 and MergeKind.BORDER not in report.merge_counts()


def test_ring_with_one_side_left_zero_is_kept() -> None:
    torch.manual_seed(0)
    model = _export(sr.SRBlock(4, sides=("top", "bottom", "left")))
    fused, report = fuse_checked(model, tol=1e-5)
    assert Reason.BORDER_INCOMPLETE in reasons(report)
    assert ops(fused)["ScatterND"] == 12 and MergeKind.BORDER not in report.merge_counts()


def test_border_of_a_conv_read_elsewhere_is_kept() -> None:
    class Shared(torch.nn.Module):
        """The 1x1's output is also read unpadded: moving the pad before it would change that."""

        def __init__(self) -> None:
            super().__init__()
            self.k0, self.k1 = torch.nn.Conv2d(4, 4, 1), torch.nn.Conv2d(4, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.k0(x)
            p = torch.nn.functional.pad(y, (1, 1, 1, 1))
            b = self.k0.bias.view(1, -1, 1, 1)
            p[:, :, 0:1, :] = b
            p[:, :, -1:, :] = b
            p[:, :, :, 0:1] = b
            p[:, :, :, -1:] = b
            return self.k1(p) + y

    model = _export(Shared())
    fused, report = fuse_checked(model, tol=1e-5)
    assert any(
        d.reason is Reason.SHARED_TENSOR and "other readers" in d.decline.message for d in report.declines
    )
    assert MergeKind.BORDER not in report.merge_counts() and ops(fused)["ScatterND"] == 4


# --------------------------------------------------------------------------- folding
def _scaled_mask_conv(bn: bool) -> onnx.ModelProto:
    """``conv(x, scale * mask)`` (initializer arithmetic feeding the weight), then maybe a BN."""
    g = Graph([1, 4, 8, 8])
    mask = np.zeros((4, 1, 3, 3), np.float32)
    mask[:, 0] = [[1, 0, -1], [2, 0, -2], [1, 0, -1]]
    w = g.node(
        "Mul",
        [g.const(g.rng.uniform(0.5, 1.5, (4, 1, 1, 1)), "scale"), g.const(mask, "mask")],
        name="scale_mask",
    )
    y = g.node(
        "Conv", ["x", w, g.const(g.rng.standard_normal(4), "b")], name="dw", group=4, pads=[1, 1, 1, 1]
    )
    return g.model([g.bn(y, 4) if bn else y])


def test_initializer_arithmetic_folds_to_a_plain_conv_then_bn_merges() -> None:
    model = _scaled_mask_conv(bn=True)
    fused, report = fuse_checked(model)
    assert ops(fused) == Counter({"Conv": 1})
    kinds = report.merge_counts()
    assert kinds[MergeKind.FOLD] == 1 and kinds[MergeKind.CONV_BN] == 1
    (fold,) = [m for m in report.merges if m.group is MergeKind.FOLD]
    assert fold.sources == ("scale_mask",) and fold.target == "scale_mask_out"
    assert "1 node(s)" in report.verbose()


def test_folded_initializer_keeps_the_tensor_name_ir_and_opset() -> None:
    model = _scaled_mask_conv(bn=False)
    model.metadata_props.add(key="author", value="me")
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    result = fold_constants(folded)
    assert [f.tensors for f in result.folded] == [("scale_mask_out",)]
    assert ops(folded) == Counter({"Conv": 1})
    assert folded.graph.node[0].input[1] == "scale_mask_out"
    assert folded.ir_version == model.ir_version and list(folded.opset_import) == list(model.opset_import)
    assert list(folded.metadata_props) == list(model.metadata_props)
    check_fused(model, folded)


def test_qdq_weight_is_left_alone() -> None:
    g = Graph([1, 4, 8, 8])
    w = g.const(g.rng.standard_normal((4, 4, 1, 1)), "w")
    scale, zero = g.const(np.float32(0.02), "s"), g.const(np.int8(0), "z", dtype=np.int8)
    q = g.node("QuantizeLinear", [w, scale, zero], name="q")
    dq = g.node("DequantizeLinear", [q, scale, zero], name="dq")
    y = g.node("Conv", ["x", dq])
    model = g.model([g.bn(y, 4)])
    fused, report = fuse_checked(model)
    assert ops(fused)["QuantizeLinear"] == 1 and ops(fused)["DequantizeLinear"] == 1
    assert Reason.QUANTIZED in reasons(report)
    assert MergeKind.FOLD not in report.merge_counts()


def test_random_normal_is_left_alone() -> None:
    g = Graph([1, 4, 8, 8])
    noise = g.node("RandomNormal", [], name="noise", shape=[1, 4, 8, 8], dtype=TensorProto.FLOAT, seed=1.0)
    scaled = g.node("Mul", [noise, g.const(np.float32(0.0), "zero")], name="scaled")
    y = g.node("Add", [g.conv("x", 4, 4, 3, pads=[1, 1, 1, 1]), scaled])
    model = g.model([y])
    fused, report = convfuse.fuse_onnx(model)
    assert ops(fused)["RandomNormal"] == 1 and ops(fused)["Mul"] == 1
    assert Reason.NONDETERMINISTIC in reasons(report)
    onnx.checker.check_model(fused, full_check=True)


def test_huge_constant_of_shape_is_declined() -> None:
    g = Graph([1, 4, 8, 8])
    side = int(np.ceil(np.sqrt(MAX_FOLDED_ELEMENTS))) + 1
    big = g.node(
        "ConstantOfShape", [g.const(np.array([side, side], np.int64), "shape", dtype=np.int64)], name="big"
    )
    total = g.node("ReduceSum", [big], name="total", keepdims=0)
    y = g.node("Add", [g.conv("x", 4, 4, 1), total])
    model = g.model([y])
    fused, report = convfuse.fuse_onnx(model)
    assert ops(fused)["ConstantOfShape"] == 1
    declined = [d for d in report.declines if d.reason is Reason.TOO_LARGE]
    assert declined and "elements" in declined[0].decline.message
    assert sum(t.ByteSize() for t in fused.graph.initializer) < 10_000


def test_symbolic_dims_fold_only_what_does_not_read_them() -> None:
    g = Graph(["n", 4, "h", "w"])
    shape = g.node("Shape", ["x"], name="shape")
    c = g.node("Gather", [shape, g.const(np.array(1, np.int64), "i", dtype=np.int64)], name="channels")
    w = g.node(
        "Mul", [g.const(g.rng.standard_normal((4, 4, 1, 1)), "w"), g.const(np.float32(2.0), "two")], name="w2"
    )
    y = g.node("Conv", ["x", w])
    scale = g.node("Cast", [c], name="cast", to=TensorProto.FLOAT)
    model = g.model([g.node("Mul", [y, scale], name="times_c")])
    fused, report = fuse_checked(model)
    assert ops(fused)["Shape"] == 1 and ops(fused)["Mul"] == 1
    assert "w2" in {s for m in report.merges for s in m.sources}


def test_static_shape_arithmetic_folds() -> None:
    g = Graph([1, 4, 8, 8])
    shape = g.node("Shape", ["x"], name="shape")
    flat = g.node("Reshape", [g.conv("x", 4, 4, 1), shape], name="reshape")
    model = g.model([flat])
    fused, report = fuse_checked(model)
    assert ops(fused)["Shape"] == 0
    assert numpy_helper.to_array(
        next(t for t in fused.graph.initializer if t.name == "shape_out")
    ).tolist() == [1, 4, 8, 8]
