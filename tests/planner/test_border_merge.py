"""Case 2 merged through both front ends (issue 14): the planner's border maps, the emitted
``Conv + Add(ring)`` (static) and ones-map forms (dynamic), float64 against torch, with the
negative twins (case 3, a copy padding mode, a ReLU between, spatial layers after the ring)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from torch import nn

import convfuse
from convfuse.border_map import BorderMap, border_merges, compose_maps
from convfuse.decline import Decline, Reason
from convfuse.frontends.torch.layers import conv_from_spec
from convfuse.frontends.torch.ring import BorderConv
from convfuse.spec import ConvSpec
from tests.support.border_cases import case2_pair, min_input
from tests.support.helpers import rel_err
from tests.support.onnx_builders import Graph, fuse_checked, ops, reasons
from tests.support.strategies import rand

TOL = 1e-9  # float64


def _pointwise(ci: int, co: int, n: int, seed: int) -> ConvSpec:
    return ConvSpec(rand(co, ci, *(1,) * n, seed=seed), rand(co, seed=seed + 1))


def _oracle(specs: list[ConvSpec], x: torch.Tensor) -> torch.Tensor:
    for s in specs:
        x = s.apply(x)
    return x


def _onnx_model(specs: list[ConvSpec], shape: list[int | str]) -> onnx.ModelProto:
    """``specs`` one after another as float64 ONNX Convs (``shape``: the input, dims or names)."""
    nodes, inits, x = [], [], "x"
    for k, s in enumerate(specs):
        w, b = f"w{k}", f"b{k}"
        inits.append(helper.make_tensor(w, TensorProto.DOUBLE, s.weight.shape, s.weight.ravel().tolist()))
        inputs = [x, w]
        if s.bias is not None:
            inits.append(helper.make_tensor(b, TensorProto.DOUBLE, s.bias.shape, s.bias.ravel().tolist()))
            inputs.append(b)
        y = f"t{k}" if k < len(specs) - 1 else "y"
        nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [y],
                name=f"conv{k}",
                kernel_shape=list(s.kernel_size),
                strides=list(s.stride),
                dilations=list(s.dilation),
                group=s.groups,
                pads=[p for p, _ in s.pads] + [p for _, p in s.pads],
            )
        )
        x = y
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.DOUBLE, shape)],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    inferred = onnx.shape_inference.infer_shapes(model)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


def _torch_model(specs: list[ConvSpec]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for s in specs:
        m = conv_from_spec(s, torch.float64)
        layers += list(m) if isinstance(m, nn.Sequential) else [m]  # asymmetric pads: pad, conv
    return nn.Sequential(*layers).eval()


@st.composite
def _case(draw: st.DrawFn) -> tuple[list[ConvSpec], list[tuple[int, ...]]]:
    """A case-2 pair, maybe a biased 1x1 after it (the ring mixed), and two input sizes."""
    a, b = draw(case2_pair())
    assume(b.is_padded)  # unpadded: plain case 1, no ring
    specs = [a, b]
    if draw(st.booleans()):
        specs.append(
            _pointwise(b.out_channels, draw(st.integers(1, 4)), a.ndim, seed=draw(st.integers(0, 99)))
        )
    low = min_input(a, b)
    sizes = [tuple(m + draw(st.integers(0, 4)) for m in low) for _ in range(2)]
    return specs, sizes


def _ring_ops(model: onnx.ModelProto) -> int:
    return sum(n.op_type == "Add" for n in model.graph.node)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(case=_case())
def test_case2_through_onnx_static_and_dynamic(case: tuple[list[ConvSpec], list[tuple[int, ...]]]) -> None:
    """One Conv plus the ring: an initializer for a static input, a ones-map conv for a
    dynamic one; equal to torch in float64 at every size."""
    specs, sizes = case
    a = specs[0]
    static = _onnx_model(specs, [2, a.in_channels, *sizes[0]])
    fused, report = convfuse.fuse_onnx(static, policy="always")
    assert [m.group.value for m in report.merges] and ops(fused)["Conv"] == 1, report.to_text(True)
    assert _ring_ops(fused) == 1 and "padding case 2" in report.merges[0].note
    x = rand(2, a.in_channels, *sizes[0], seed=3)
    (y,) = ReferenceEvaluator(fused).run(None, {"x": x.numpy()})
    assert rel_err(_oracle(specs, x), torch.from_numpy(y)) < TOL
    names = [f"d{k}" for k in range(a.ndim)]
    dynamic = _onnx_model(specs, ["n", a.in_channels, *names])
    fused, report = convfuse.fuse_onnx(dynamic, policy="always")
    assert ops(fused)["Conv"] == 2 and ops(fused)["ConstantOfShape"] == 1, report.to_text(True)
    for k, size in enumerate(sizes):
        x = rand(1 + k, a.in_channels, *size, seed=4 + k)
        (y,) = ReferenceEvaluator(fused).run(None, {"x": x.numpy()})
        assert rel_err(_oracle(specs, x), torch.from_numpy(y)) < TOL


@settings(max_examples=40, deadline=None)
@given(case=_case(), example=st.booleans())
def test_case2_through_torch(case: tuple[list[ConvSpec], list[tuple[int, ...]]], example: bool) -> None:
    """One conv in a BorderConv, exact in float64 at the example size and at another one."""
    specs, sizes = case
    b = specs[1]
    specs[1] = b.replace(pads=tuple((p, p) for p, _ in b.pads))  # torch pads symmetrically
    assume(specs[1].is_padded)
    low = min_input(specs[0], specs[1])
    sizes = [tuple(max(m, n) for m, n in zip(low, size)) for size in sizes]
    model = _torch_model(specs)
    x0 = rand(2, specs[0].in_channels, *sizes[0], seed=5)
    fused, report = convfuse.fuse_with_report(model, policy="always", example_inputs=x0 if example else None)
    borders = [m for m in fused.modules() if isinstance(m, BorderConv)]
    assert len(borders) == 1, report.to_text(True)
    assert sum(isinstance(m, nn.modules.conv._ConvNd) for m in fused.modules()) == 1
    assert (borders[0].size is not None) == example  # the dense ring only for a known size
    for k, size in enumerate(sizes):
        x = rand(1 + k, specs[0].in_channels, *size, seed=6 + k)
        assert rel_err(model(x), fused(x)) < TOL


# ----------------------------------------------------------------------------- the expansion block
def _expansion(c: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, 4 * c, 3, padding=1), nn.Conv2d(4 * c, c, 1)
    ).eval()


@pytest.mark.parametrize("example", [True, False])
def test_expansion_block_with_default_biases_torch(example: bool) -> None:
    block = _expansion()
    x = torch.randn(2, 8, 14, 14)
    fused, report = convfuse.fuse_with_report(block, example_inputs=x if example else None)
    (border,) = [m for m in fused.modules() if isinstance(m, BorderConv)]
    assert isinstance(border.conv, nn.Conv2d) and border.conv.kernel_size == (3, 3)
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1
    assert "padding case 2" in report.merges[0].note
    for size in (14, 9):
        x = torch.randn(2, 8, size, size + 3)
        assert rel_err(block(x), fused(x)) < 1e-5
    assert border.ring_weight0.dtype == torch.float32 and "ring" in repr(border)
    keys = set(border.state_dict())
    assert {"conv.weight", "conv.bias", "ring_weight0", "ring_bias0"} <= keys and ("ring" in keys) == example
    double = convfuse.fuse(block.double())
    x = torch.randn(1, 8, 10, 10, dtype=torch.float64)
    assert rel_err(block(x), double(x)) < TOL


def _expansion_onnx(shape: list[int | str]) -> onnx.ModelProto:
    """The expansion block as ONNX: 1x1 (8 -> 32) -> 3x3 padded -> 1x1 (32 -> 8), all biased."""
    g = Graph(shape)
    y = g.conv("x", 8, 32, 1)
    y = g.conv(y, 32, 32, 3, pads=[1, 1, 1, 1])
    y = g.conv(y, 32, 8, 1)
    return g.model([y])


def test_expansion_block_with_default_biases_onnx() -> None:
    fused, report = fuse_checked(_expansion_onnx([1, 8, 14, 14]))
    assert ops(fused) == {"Conv": 1, "Add": 1}
    ring = [t for t in fused.graph.initializer if "border_ring" in t.name]
    assert len(ring) == 1 and list(ring[0].dims) == [1, 8, 14, 14]
    assert "padding case 2" in report.merges[0].note


def test_large_input_takes_the_constant_ones_map_form_onnx() -> None:
    """At 64x64 the dense ring (8x64x64) outweighs the weights the merge saves under ``flops``:
    the ring is a one-channel Conv of a constant ones map instead (two nodes, 4K + 80 numbers)."""
    fused, report = fuse_checked(_expansion_onnx([1, 8, 64, 64]))
    assert ops(fused) == {"Conv": 2, "Add": 1}
    (ones,) = [t for t in fused.graph.initializer if "border_ones" in t.name]
    assert list(ones.dims) == [1, 1, 64, 64] and "constant ones map" in report.merges[0].note
    (m,) = report.merges
    assert m.after.macs <= m.before.macs and m.after.params <= m.before.params


def test_expansion_block_dynamic_onnx() -> None:
    """Dynamic size: the run-time ring (Shape .. ConstantOfShape, Conv, Add) under ``always``;
    under ``flops`` it would grow the graph (6 nodes for 2 removed): declined as case 2."""
    model = _expansion_onnx(["n", 8, "h", "w"])
    fused, _ = fuse_checked(model, policy="always")
    assert ops(fused)["Conv"] == 2 and ops(fused)["ConstantOfShape"] == 1
    fused, report = fuse_checked(model)
    assert ops(fused) == {"Conv": 2} and Reason.PADDED_AFTER_BIASED_POINTWISE in reasons(report)
    assert any("adds 6 nodes" in d.decline.message for d in report.declines)


# ----------------------------------------------------------------------------- what follows the ring
def test_fusing_a_fused_model_again_keeps_the_border_conv() -> None:
    """A BorderConv is a leaf for torch.fx: a second pass traces its parent and leaves it whole."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _expansion()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + x)

    block = Block().eval()
    once = convfuse.fuse(block)
    twice, report = convfuse.fuse_with_report(once)
    assert not any(d.reason is Reason.UNTRACEABLE for d in report.declines), report.to_text(True)
    assert sum(isinstance(m, BorderConv) for m in twice.modules()) == 1
    x = torch.randn(1, 8, 10, 10)
    assert rel_err(block(x), twice(x)) < 1e-5


def test_residual_and_bn_after_the_ring_torch() -> None:
    """A sum with the input (a plain branch on the same grid) and a BN after it carry the ring."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.expand = nn.Conv2d(6, 12, 1)
            self.spatial = nn.Conv2d(12, 12, 3, padding=1, groups=3)
            self.project = nn.Conv2d(12, 6, 1)
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.project(self.spatial(self.expand(x))) + x)

    torch.manual_seed(1)
    block = Block().eval()
    block.bn.running_mean.uniform_(-1, 1)
    block.bn.running_var.uniform_(0.5, 2)
    block = block.double()
    fused, report = convfuse.fuse_with_report(block, policy="always")
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1, report.to_text(True)
    x = torch.randn(2, 6, 11, 8, dtype=torch.float64)
    assert rel_err(block(x), fused(x)) < TOL


def test_concat_and_scaled_difference_carry_the_ring_torch() -> None:
    """``cat([b(a(x)), c(x)])`` and ``x - 0.5 * b(a(x))``: the ring placed in its rows, scaled."""

    class Cat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = (
                nn.Conv2d(4, 6, 1),
                nn.Conv2d(6, 5, 3, padding=1),
                nn.Conv2d(4, 3, 3, padding=1),
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.c(x), self.b(self.a(x))], 1)

    class Diff(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv1d(4, 6, 1), nn.Conv1d(6, 4, 5, padding=2, dilation=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x - 0.5 * self.b(self.a(x))

    torch.manual_seed(2)
    for block, shape in ((Cat(), (2, 4, 7, 9)), (Diff(), (2, 4, 13))):
        block = block.double().eval()
        fused, report = convfuse.fuse_with_report(block, policy="always")
        assert sum(isinstance(m, nn.modules.conv._ConvNd) for m in fused.modules()) == 1, report.to_text(True)
        x = torch.randn(*shape, dtype=torch.float64)
        assert rel_err(block(x), fused(x)) < TOL


def test_spatial_layer_after_the_ring_declines() -> None:
    """Negative twin: an unpadded 3x3 after the ring: the ring is not constant through it."""
    a, b = _pointwise(3, 4, 2, 1), ConvSpec(rand(4, 4, 3, 3, seed=3), pads=((1, 1), (1, 1)))
    c = ConvSpec(rand(2, 4, 3, 3, seed=4))
    bm = compose_maps(a, b)
    assert isinstance(bm, BorderMap)
    after = compose_maps(bm, c)
    assert isinstance(after, Decline) and after.reason is Reason.BORDER_RING
    padded = compose_maps(bm, _pointwise(4, 4, 2, 5).replace(pads=((1, 1), (1, 1))))
    assert isinstance(padded, Decline) and padded.reason is Reason.BORDER_RING
    model = _torch_model([a, b, c])
    fused, report = convfuse.fuse_with_report(model, policy="always")
    x = rand(2, 3, 9, 9, seed=6)
    assert rel_err(model(x), fused(x)) < TOL
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2  # one pair merges, not all three


# ----------------------------------------------------------------------------- negative twins
def test_case3_stays_declined_in_both_front_ends() -> None:
    """A 3x3 (spatial) before the padded conv: the border depends on the input."""
    g = Graph([1, 4, 9, 9])
    y = g.conv("x", 4, 8, 3)
    y = g.conv(y, 8, 8, 3, pads=[1, 1, 1, 1])
    fused, report = fuse_checked(g.model([y]), policy="always")
    assert ops(fused) == {"Conv": 2} and Reason.PADDED_AFTER_SPATIAL in reasons(report)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, padding=1)).eval()
    fused_t, report_t = convfuse.fuse_with_report(model, policy="always")
    assert Reason.PADDED_AFTER_SPATIAL in {d.reason for d in report_t.declines}
    assert not any(isinstance(m, BorderConv) for m in fused_t.modules())


def test_reflect_padding_after_strided_pointwise_stays_declined() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 1, stride=2), nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    fused, report = convfuse.fuse_with_report(model.eval(), policy="always")
    assert Reason.PADDING_MODE in {d.reason for d in report.declines}
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2


def test_relu_between_stays_two_convs() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).eval()
    fused, report = convfuse.fuse_with_report(model, policy="always")
    assert not report.merges and sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 2
    g = Graph([1, 4, 9, 9])
    y = g.node("Relu", [g.conv("x", 4, 8, 1)])
    fused_o, _ = fuse_checked(g.model([g.conv(y, 8, 8, 3, pads=[1, 1, 1, 1])]), policy="always")
    assert ops(fused_o) == {"Conv": 2, "Relu": 1}


# ----------------------------------------------------------------------------- policy
def test_flops_never_raises_macs_and_says_case_2() -> None:
    """BN then a padded 3x3: the ring (an Add, or a ones-map conv) costs more than the BN saves
    under ``flops``; ``always`` merges it."""
    g = Graph([1, 4, 9, 9])
    y = g.conv(g.bn("x", 4), 4, 8, 3, pads=[1, 1, 1, 1])
    model = g.model([y])
    fused, report = fuse_checked(model)
    assert ops(fused) == {"Conv": 1, "BatchNormalization": 1}
    (declined,) = [d for d in report.declines if d.reason is Reason.PADDED_AFTER_BIASED_POINTWISE]
    assert "border correction, which does not pay" in declined.decline.message
    fused, report = fuse_checked(model, policy="always")
    assert ops(fused) == {"Conv": 1, "Add": 1} and report.merges[0].after.macs >= report.merges[0].before.macs
    specs = [
        _pointwise(4, 16, 2, 1),
        ConvSpec(rand(16, 16, 3, 3, seed=2), pads=((1, 1),) * 2),
        _pointwise(16, 4, 2, 3),
    ]
    for m in convfuse.fuse_onnx(_onnx_model(specs, [1, 4, 16, 16]))[1].merges:
        assert m.after.macs <= m.before.macs and m.after.params <= m.before.params


def test_switched_off_is_case_1_only() -> None:
    g = Graph([1, 4, 9, 9])
    y = g.conv(g.conv("x", 4, 8, 1), 8, 8, 3, pads=[1, 1, 1, 1])
    with border_merges(False):
        fused, report = fuse_checked(g.model([y]), policy="always")
    assert ops(fused) == {"Conv": 2} and reasons(report) == {Reason.PADDED_AFTER_BIASED_POINTWISE}
    fused, _ = fuse_checked(g.model([y]), policy="always")
    assert ops(fused) == {"Conv": 1, "Add": 1}


def test_dense_ring_and_float16_keep_dtype() -> None:
    g = Graph([1, 4, 9, 9], elem=TensorProto.FLOAT16)
    y = g.conv(g.conv("x", 4, 8, 1), 8, 8, 3, pads=[1, 1, 1, 1])
    fused, _ = fuse_checked(g.model([y]), policy="always")
    ring = [t for t in fused.graph.initializer if "border_ring" in t.name]
    assert ring and all(t.data_type == TensorProto.FLOAT16 for t in ring)
    assert np.isfinite(onnx.numpy_helper.to_array(ring[0])).all()
