"""Property test over random module trees (issue 10): routing parents (traceable or not),
Sequentials, custom blocks with plain attributes, sums of branches, explicit pads. Whatever the
tree, ``convfuse.fuse`` returns a module that runs and matches the original, keeps the class and
attributes of every module it did not replace, and leaves the caller's model unchanged.

Models are built in float64 so that "matches" can be tight (1e-9) without flakiness; the twin
of every drawn tree is the tree itself with ``check=False``, which must match as well (the
self-check is a safety net, not what makes the merges right).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import convfuse
from convfuse.frontends.torch.surgery import original_class
from tests.support._torch_models import RepVGGBlock, rand_bn
from tests.support.helpers import rel_err
from tests.support.public_style_models import RoutingParent, TrainBlock

C = 4
TOL = 1e-9


class ConvBN(nn.Module):
    """A conv + BN block with plain attributes, as model code writes its layers."""

    def __init__(self, k: int, tag: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, C, k, padding=k // 2, bias=False)
        self.bn = rand_bn(C)
        self.act = nn.ReLU()
        self.tag = tag
        self.k = k

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Scaled(nn.Module):
    """Two children combined with a plain attribute: ``a(x) + alpha * b(x)``."""

    def __init__(self, a: nn.Module, b: nn.Module, alpha: float) -> None:
        super().__init__()
        self.a, self.b, self.alpha = a, b, alpha

    def forward(self, x):
        return self.a(x) + self.alpha * self.b(x)


def _leaf(kind: str, tag: str) -> nn.Module:
    return {
        "conv3": lambda: nn.Conv2d(C, C, 3, padding=1),
        "conv1": lambda: nn.Conv2d(C, C, 1),
        "bn": lambda: rand_bn(C),
        "relu": lambda: nn.ReLU(),
        "convbn": lambda: ConvBN(3, tag),
        "convbn1": lambda: ConvBN(1, tag),
        "rep": lambda: RepVGGBlock(C, C),
        "pad": lambda: TrainBlock(C, 2 * C),
    }[kind]()


@st.composite
def _tree(draw: st.DrawFn, depth: int = 0) -> nn.Module:
    kinds = ["conv3", "conv1", "bn", "relu", "convbn", "convbn1", "rep", "pad"]
    if depth >= 2 or draw(st.integers(0, 2)) == 0:
        return _leaf(draw(st.sampled_from(kinds)), f"t{depth}")
    shape = draw(st.sampled_from(["router", "router", "seq", "scaled"]))  # routing parents most often
    if shape == "scaled":
        return Scaled(draw(_tree(depth + 1)), draw(_tree(depth + 1)), draw(st.sampled_from([0.5, -1.0, 2.0])))
    n = draw(st.integers(2, 4))
    children = [draw(_tree(depth + 1)) for _ in range(n)]
    if shape == "seq":
        return nn.Sequential(*children)
    routes = [-1] + [draw(st.sampled_from(list(range(i)) + [-1])) for i in range(1, n)]
    return RoutingParent(children, routes, channels=C if draw(st.booleans()) else None)


_ATTRS = ("tag", "k", "alpha", "f", "i", "save", "channels")


def _check_identity(model: nn.Module, fused: nn.Module) -> None:
    """Every module of ``model`` still at its path in ``fused`` (and not replaced by a layer
    convfuse writes) has its class and plain attributes; routed Sequentials keep their length."""
    for name, m in model.named_modules():
        try:
            f = fused.get_submodule(name) if name else fused
        except AttributeError:
            continue
        if isinstance(f, (nn.Identity, nn.Conv2d)) and not isinstance(m, (nn.Identity, nn.Conv2d)):
            continue  # absorbed or merged into a conv: replaced
        if type(m).__module__.startswith("torch.nn") and not isinstance(m, nn.Sequential):
            continue
        if isinstance(m, nn.Sequential) and not isinstance(f, nn.Sequential):
            continue  # a run of a Sequential called whole replaced by a merged layer
        assert original_class(f) is type(m), (name, type(f), type(m))
        for attr in _ATTRS:
            if hasattr(m, attr):
                assert getattr(f, attr) == getattr(m, attr), (name, attr)
        if isinstance(m, RoutingParent):
            assert len(f.model) == len(m.model), name


@settings(max_examples=40)
@given(_tree(), st.booleans())
def test_random_module_trees_fuse_to_modules_that_run_and_match(model: nn.Module, with_inputs: bool) -> None:
    torch.manual_seed(0)
    model = model.double().eval()
    x = torch.randn(2, C, 6, 6, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = convfuse.fuse(model, example_inputs=x if with_inputs else None)
    with torch.no_grad():
        ref = model(x)
        assert rel_err(ref, fused(x)) <= TOL
        assert rel_err(ref, fused(x)) <= TOL  # a second call (cached state, attribute writes)
    _check_identity(model, fused)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    unchecked = convfuse.fuse(model, example_inputs=x if with_inputs else None, check=False)
    with torch.no_grad():
        assert rel_err(ref, unchecked(x)) <= TOL
