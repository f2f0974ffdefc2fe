"""Issue 11's 4th row: Linear and BatchNorm1d agree through regrouping reshapes, in both front ends.

A LeViT-style hybrid ViT (:mod:`tests.support.vit_models`) writes every projection as
``bn(linear(x).flatten(0, 1)).reshape_as(x)``: the BN is a per-feature affine of the Linear's
output, so each pair is one Linear; the conv+BN stem folds; the distilled head is one Gemm. No
BatchNorm is left, by either front end, with or without example inputs for torch. Each twin
changes one thing that makes the pair not a per-feature affine and keeps its BN.
"""

from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch
from onnx.reference import ReferenceEvaluator
from torch import nn

import convfuse
from benchmarks.linear_regions import counts, export
from benchmarks.region_blocks import BLOCKS, TWINS, randomize
from convfuse import Reason
from convfuse.errors import TrainingModeError
from convfuse.frontends.onnx.stats import model_stats
from tests.planner.test_region_properties import _run
from tests.support.helpers import rel_err
from tests.support.vit_models import HybridViT, LinearNorm

VIT = "hybrid ViT: Linear+BN1d via flatten(0, 1)/reshape_as, conv+BN stem"
VIT_TWINS = [name for name in TWINS if name.startswith("ViT block")]


def _groups(c: dict) -> tuple[int, ...]:
    return tuple(c[k] for k in ("Conv", "BN", "Add", "Gemm"))


def _vit(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, torch.Tensor]:
    module, x = BLOCKS[VIT]()
    return module.to(dtype), x.to(dtype)


@pytest.mark.parametrize("example", [True, False], ids=["example-inputs", "inferred-input"])
def test_hybrid_vit_has_no_batchnorm_left_in_torch(example: bool) -> None:
    module, x = _vit()
    with torch.no_grad():
        ref = module(x)
    fused, report = convfuse.fuse(module, example_inputs=x if example else None, return_report=True)
    with torch.no_grad():
        assert rel_err(ref, fused(x)) <= 1e-5
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    before, after = counts(export(module, x)), counts(export(fused, x))
    assert before["BN"] == 17 and after["BN"] == 0
    # 12 LinearNorm + 4 attention products + 2 heads -> 12 Linear (with bias) + 4 products + 1 head
    assert (before["Gemm"], after["Gemm"]) == (18, 17)
    assert after["Conv"] == 3 and after["params"] < before["params"]
    linear = [m for m in report.merges if "linear" in m.kind or "bn" in m.kind]
    assert len(linear) >= 13


def test_hybrid_vit_has_no_batchnorm_left_in_onnx() -> None:
    module, x = _vit()
    with torch.no_grad():
        ref = module(x)
    original = export(module, x)
    fused, report = convfuse.fuse_onnx(original)
    assert rel_err(ref, torch.as_tensor(_run(fused, x))) <= 1e-5
    onnx.checker.check_model(fused)
    assert _groups(counts(original)) == (3, 17, 5, 18)
    assert _groups(counts(fused)) == (3, 0, 16, 17)  # Add: 4 residuals + the 12 merged Linears' biases


def test_hybrid_vit_front_ends_agree() -> None:
    module, x = _vit()
    fused_torch = convfuse.fuse(module)
    fused_onnx, _ = convfuse.fuse_onnx(export(module, x))
    via_torch, via_onnx = counts(export(fused_torch, x)), counts(fused_onnx)
    assert _groups(via_torch) == _groups(via_onnx)
    assert via_torch["params"] == via_onnx["params"]


def test_hybrid_vit_in_float64() -> None:
    module, x = _vit(torch.float64)
    with torch.no_grad():
        ref = module(x)
    fused = convfuse.fuse(module, example_inputs=x)
    with torch.no_grad():
        assert rel_err(ref, fused(x)) <= 1e-9
    original = export(module, x)
    fused_onnx, _ = convfuse.fuse_onnx(original)
    assert counts(fused_onnx)["BN"] == 0
    # ONNX Runtime has no float64 Conv; the reference evaluator runs both graphs (the export
    # graph itself differs from torch by ~5e-9 there)
    ref_onnx, out = (
        torch.as_tensor(ReferenceEvaluator(g).run(None, {g.graph.input[0].name: x.numpy()})[0])
        for g in (original, fused_onnx)
    )
    assert rel_err(ref_onnx, out) <= 1e-9


@pytest.mark.parametrize("name", VIT_TWINS)
def test_twin_keeps_its_batchnorm(name: str) -> None:
    module, x = TWINS[name]()
    with torch.no_grad():
        ref = module(x)
    original = export(module, x)
    fused_onnx, _ = convfuse.fuse_onnx(original, policy="always")
    fused_torch = convfuse.fuse(module, policy="always")
    with torch.no_grad():
        assert rel_err(ref, fused_torch(x)) <= 1e-5
    assert rel_err(ref, torch.as_tensor(_run(fused_onnx, x))) <= 1e-5
    # the stem's three conv+BN and the head fold; the twin block's BN stays, its Linear alone
    assert _groups(counts(original)) == (3, 6, 2, 3)
    assert _groups(counts(export(fused_torch, x))) == _groups(counts(fused_onnx)) == (3, 1, 1, 2)


def test_training_mode_batchnorm_is_refused() -> None:
    module = randomize(HybridViT(16, depth=0, block=LinearNorm(16, 16)), 14)
    x = torch.randn(2, 3, 32, 32)
    module.blocks[0].m.bn.train()
    with pytest.raises(TrainingModeError):
        convfuse.fuse(module)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), buf, opset_version=17, dynamo=False, do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
        )  # fmt: skip
    fused, report = convfuse.fuse_onnx(onnx.load_from_string(buf.getvalue()))
    assert counts(fused)["BN"] == 1
    assert Reason.TRAINING_MODE in {d.reason for d in report.declines}


def test_eval_twin_of_the_training_mode_case_merges() -> None:
    module = randomize(HybridViT(16, depth=0, block=LinearNorm(16, 16)), 14)
    x = torch.randn(2, 3, 32, 32)
    assert counts(export(convfuse.fuse(module), x))["BN"] == 0
    assert counts(convfuse.fuse_onnx(export(module, x))[0])["BN"] == 0


class _Flattened(nn.Module):
    """``bn(linear(x).flatten(0, 1))`` read as it is (``[B*N, C]``): the merged Linear keeps
    ``x``'s leading dims, so both writers flatten them back."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, c, 1)
        self.c = nn.Linear(c, c, bias=False)
        self.bn = nn.BatchNorm1d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.relu(self.stem(x)).transpose(1, 2)
        return self.bn(self.c(t).flatten(0, 1))


def test_merge_ending_in_other_leading_dims_flattens_back() -> None:
    module = randomize(_Flattened(), 15)
    x = torch.randn(2, 3, 5)
    with torch.no_grad():
        ref = module(x)
    for example in (x, None):
        fused = convfuse.fuse(module, example_inputs=example)
        with torch.no_grad():
            out = fused(x)
        assert out.shape == ref.shape and rel_err(ref, out) <= 1e-5
        assert counts(export(fused, x))["BN"] == 0
    fused_onnx, _ = convfuse.fuse_onnx(export(module, x))
    assert counts(fused_onnx)["BN"] == 0
    assert rel_err(ref, torch.as_tensor(_run(fused_onnx, x))) <= 1e-5


class _Unflattened(_Flattened):
    """Twin: ``view(5, 2, C)`` regroups the leading dims into another shape than ``x``'s and
    than ``[N, C]``: torch models run at any size, so torch keeps the layers; the ONNX graph
    has static shapes, so a Reshape to the output's shape gives them back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = torch.relu(self.stem(x)).transpose(1, 2)
        return self.bn(self.c(t).flatten(0, 1)).view(5, 2, 8)


def _fused_in_torch(module: nn.Module, x: torch.Tensor):  # type: ignore[no-untyped-def]
    """The reference output, the module fused with ``x`` as example inputs (checked), its report."""
    with torch.no_grad():
        ref = module(x)
    fused, report = convfuse.fuse(module, example_inputs=x, return_report=True)
    with torch.no_grad():
        assert rel_err(ref, fused(x)) <= 1e-5
    return ref, fused, report


def test_merge_ending_in_another_leading_shape_keeps_its_layers_in_torch() -> None:
    module, x = randomize(_Unflattened(), 16), torch.randn(2, 3, 5)
    ref, fused, report = _fused_in_torch(module, x)
    assert counts(export(fused, x))["BN"] == 1
    assert Reason.RANK_MISMATCH in {d.reason for d in report.declines}
    fused_onnx, _ = convfuse.fuse_onnx(export(module, x))  # static shapes: a Reshape gives it back
    assert counts(fused_onnx)["BN"] == 0
    assert rel_err(ref, torch.as_tensor(_run(fused_onnx, x))) <= 1e-5


def test_regroup_among_convolutions_is_not_an_identity() -> None:
    """A reshape keeping the last dim is the identity only on a Linear's features: between two
    1x1 convs (channels at dim 1) it moves the channels, so nothing merges across it."""

    class ConvRegroupConv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(4, 4, 1)
            self.b = nn.Conv1d(4, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).flatten(0, 1).reshape(2, 4, 6))

    module = ConvRegroupConv().eval()
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        ref = module(x)
    fused = convfuse.fuse(module, policy="always", example_inputs=x)
    with torch.no_grad():
        assert rel_err(ref, fused(x)) <= 1e-5
    assert counts(export(fused, x))["Conv"] == 2
    fused_onnx, _ = convfuse.fuse_onnx(export(module, x), policy="always")
    assert counts(fused_onnx)["Conv"] == 2
    assert rel_err(ref, torch.as_tensor(_run(fused_onnx, x))) <= 1e-5


def test_linear_norm_alone_needs_shapes_in_torch() -> None:
    """Without a conv to infer an input from, torch has no ranks: the pair is kept (the planner
    asks for example inputs); with them it merges."""
    module = randomize(LinearNorm(8, 8), 17)
    x = torch.randn(2, 5, 8)
    _, report = convfuse.fuse(module, return_report=True)
    assert not report.merges
    fused = convfuse.fuse(module, example_inputs=x)
    with torch.no_grad():
        assert rel_err(module(x), fused(x)) <= 1e-5
    assert counts(export(fused, x))["BN"] == 0


def _export_dynamic(module: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    """Exported with a symbolic batch: ``reshape_as(t)`` stays ``Reshape(v, Shape(t))``."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (x,), buf, opset_version=17, dynamo=False, do_constant_folding=False,
            input_names=["x"], dynamic_axes={"x": {0: "batch"}},
        )  # fmt: skip
    return onnx.load_from_string(buf.getvalue())


def test_hybrid_vit_with_a_symbolic_batch_in_onnx() -> None:
    module, x = _vit()
    original = _export_dynamic(module, x)
    assert any(n.op_type == "Shape" for n in original.graph.node)
    fused, _ = convfuse.fuse_onnx(original)
    assert _groups(counts(fused)) == (3, 0, 16, 17)
    for batch in (2, 3):
        xb = torch.randn(batch, *x.shape[1:])
        with torch.no_grad():
            assert rel_err(module(xb), torch.as_tensor(_run(fused, xb))) <= 1e-5


class _ShapeKept(_Flattened):
    """Twin: ``reshape_as(t)`` also reshapes ``relu(u)``, a tensor no merge replaces, so ``t``
    (the Linear's output) must stay computed for its shape; only ``u`` is a merge's output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.c(torch.relu(self.stem(x)).transpose(1, 2))
        u = self.bn(t.flatten(0, 1))
        return u.reshape_as(t) + torch.relu(u).reshape_as(t)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-batch"])
def test_a_shape_read_of_a_replaced_tensor_keeps_it(dynamic: bool) -> None:
    module, x = randomize(_ShapeKept(), 18), torch.randn(2, 3, 5)
    ref, fused, report = _fused_in_torch(module, x)
    assert sum(isinstance(m, nn.Linear) for m in fused.modules()) == 1  # no copy of the Linear
    assert Reason.SHARED_TENSOR in {d.reason for d in report.declines}  # torch sizes vary: kept
    original = (_export_dynamic if dynamic else export)(module, x)
    fused_onnx, o_report = convfuse.fuse_onnx(original)
    assert rel_err(ref, torch.as_tensor(_run(fused_onnx, x))) <= 1e-5
    assert model_stats(fused_onnx).params <= model_stats(original).params
    if dynamic:  # Shape(t) stays: the Linear and its BN stay as they are
        assert counts(fused_onnx)["BN"] == 1
        assert Reason.SHARED_TENSOR in {d.reason for d in o_report.declines}
