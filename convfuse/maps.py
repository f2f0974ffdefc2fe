"""The one place the planner combines linear maps: a table of rules, dispatched on map types.

Inside a region every tensor is a linear map of the region's input (DESIGN.md section 5): a
:class:`~convfuse.spec.ConvSpec`, a :class:`~convfuse.transpose.ConvTransposeSpec`, or a
:class:`~convfuse.border_map.BorderMap` (a conv plus a constant border ring, padding case 2). The
planner combines maps in four ways, and each way is a table here whose entries state their
pattern (the map types they take), their conditions and the algebra that computes them:

- :func:`compose` ``(a, b)``: ``b(a(x))``, an entry per ``(type(a), type(b))``;
- :func:`add` ``(parts)``: ``sum_i parts[i](x)``, an entry per set of part types;
- :func:`concat` ``(parts)``: the parts stacked on channels, an entry per set of part types;
- :func:`scaled` ``(m, c)``: ``c * m(x)``, an entry per type.

A pair or set with no entry is a typed decline (``unsupported``), never a silent skip. Rules
only dispatch: the math, its conditions checked and its declines, lives in the algebra functions
each entry names (:mod:`convfuse.algebra`, :mod:`convfuse.transpose`).

What the planner needs to know about one map (its cost, the layers writing it takes, whether the
latency model can time it) is a :class:`MapType` entry of :data:`TYPES`. **Adding a map type**
(for instance a conv plus a constant border ring) is one :class:`MapType` and the rule entries
that combine it with the others; the planner does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard, overload

from . import algebra, algebra_linear, estimate
from . import border_map as bm
from . import transpose as tr
from .border_map import BorderMap
from .decline import Decline, Reason
from .spec import ConvSpec
from .transpose import ConvTransposeSpec

__all__ = [
    "Map",
    "MapType",
    "Rule",
    "TYPES",
    "COMPOSE",
    "ADD",
    "CONCAT",
    "SCALED",
    "compose",
    "identity",
    "add",
    "concat",
    "scaled",
    "predicted",
    "macs",
    "params",
    "input_positions",
    "without_zero_bias",
    "layers_written",
    "timed",
    "unwritable",
    "rule_table",
]

#: A tensor of a region as a linear map of the region's input.
Map = ConvSpec | ConvTransposeSpec | BorderMap


# --------------------------------------------------------------------------- map types
@dataclass(frozen=True)
class MapType:
    """What the planner asks of one kind of map.

    ``macs``: multiply-accumulates per output position; ``params``: stored elements;
    ``input_positions``: input positions per output position (a conv's ``prod(stride)``, a
    transposed conv's ``1 / prod(stride)``: how costs of earlier layers scale); ``without_zero_bias``:
    the same map with an all-zero bias dropped; ``layers``: how many layers writing it takes
    (``pad_layer``: the front end writes padding it cannot say as an extra layer, as torch does);
    ``timed``: whether :mod:`convfuse.latency` can time it; ``unwritable``: why the front end
    could not write it as one layer (or its layers), else None.
    """

    name: str
    macs: Callable[[Any], float]
    params: Callable[[Any], int]
    input_positions: Callable[[Any], float]
    without_zero_bias: Callable[[Any], Any]
    layers: Callable[[Any, bool], int]
    timed: bool = False
    unwritable: Callable[[Any, bool], Decline | None] = lambda m, pad_layer: None
    conv_part: Callable[[Any], ConvSpec | None] = lambda m: None  # what the shape predictor reads


def _conv_positions(m: ConvSpec) -> float:
    p = 1
    for s in m.stride:
        p *= s
    return float(p)


def _conv_layers(m: ConvSpec, pad_layer: bool) -> int:
    return 2 if pad_layer and any(b != e for b, e in m.pads) else 1


def _transposed_without_zero_bias(m: ConvTransposeSpec) -> ConvTransposeSpec:
    return m if m.bias is None or m.has_nonzero_bias() else m.replace(bias=None)


def _transposed_layers(m: ConvTransposeSpec, pad_layer: bool) -> int:
    return 2 if pad_layer and m.symmetric_form() is None else 1  # torch: ConvTransposeNd + Crop


def _transposed_unwritable(m: ConvTransposeSpec, pad_layer: bool) -> Decline | None:
    """The end extension ``max(op - pe, 0)`` both writers put in ``output_padding``: torch
    (``pad_layer``) needs it below ``max(stride, dilation)`` where the one-module form does not
    apply, ONNX Runtime below the stride."""
    if pad_layer and m.symmetric_form() is not None:
        return None
    extend = [max(op - e, 0) for (_, e), op in zip(m.pads, m.output_padding)]
    limit = [max(s, d) if pad_layer else s for s, d in zip(m.stride, m.dilation)]
    if all(x < lim for x, lim in zip(extend, limit)):
        return None
    needs = (
        "torch needs that below max(stride, dilation)"
        if pad_layer
        else "ONNX Runtime needs that below the stride"
    )
    return Decline(
        Reason.UNSUPPORTED,
        f"the merged transposed conv extends its output by {extend} past its full size; {needs} = {limit}",
    )


#: Map class -> what the planner asks of it.
TYPES: dict[type, MapType] = {
    ConvSpec: MapType(
        "conv",
        macs=lambda m: m.macs_per_position(),
        params=lambda m: m.params(),
        input_positions=_conv_positions,
        without_zero_bias=algebra_linear.without_zero_bias,
        layers=_conv_layers,
        timed=True,
        conv_part=lambda m: m,
    ),
    # The merge of a border map is judged on its conv, the ring's cost added by the planner
    # (border_map.correction_options): these are the conv's figures.
    BorderMap: MapType(
        "conv with a border ring",
        macs=lambda m: m.spec.macs_per_position(),
        params=lambda m: m.spec.params(),
        input_positions=lambda m: _conv_positions(m.spec),
        without_zero_bias=lambda m: m,
        layers=lambda m, pad_layer: _conv_layers(m.spec, pad_layer),
        conv_part=lambda m: m.spec,
    ),
    ConvTransposeSpec: MapType(
        "transposed conv",
        macs=lambda m: m.macs_per_position(),
        params=lambda m: m.params(),
        input_positions=lambda m: m.input_positions(),
        without_zero_bias=_transposed_without_zero_bias,
        layers=_transposed_layers,
        unwritable=_transposed_unwritable,
    ),
}


def _type(m: Map) -> MapType:
    found = TYPES.get(type(m))
    if found is None:
        raise TypeError(f"{type(m).__name__} is not a map type convfuse.maps knows")
    return found


def macs(m: Map) -> float:
    """Multiply-accumulates of ``m`` per output position."""
    return _type(m).macs(m)


def params(m: Map) -> int:
    """Stored elements of ``m`` (weight and bias)."""
    return _type(m).params(m)


def input_positions(m: Map) -> float:
    """Positions of ``m``'s input per position of its output."""
    return _type(m).input_positions(m)


@overload
def without_zero_bias(m: ConvSpec) -> ConvSpec: ...
@overload
def without_zero_bias(m: ConvTransposeSpec) -> ConvTransposeSpec: ...
@overload
def without_zero_bias(m: BorderMap) -> BorderMap: ...
def without_zero_bias(m: Map) -> Map:
    """``m`` with an all-zero bias left out (both writers drop it)."""
    return _type(m).without_zero_bias(m)


def layers_written(m: Map, pad_layer: bool) -> int:
    """Layers the front end writes for ``m`` (``pad_layer``: it writes unsayable padding apart)."""
    return _type(m).layers(m, pad_layer)


def unwritable(m: Map, pad_layer: bool) -> Decline | None:
    """Why the front end could not write ``m`` (``pad_layer``: the torch writer), else None."""
    return _type(m).unwritable(m, pad_layer)


def timed(m: Map) -> TypeGuard[ConvSpec]:  # only ConvSpec's type is timed
    """Whether the latency model can time ``m``."""
    return _type(m).timed


# --------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """One table entry: ``pattern`` (the operand types: ``(A, B)`` for compose, the set of part
    types for add/concat, ``(T,)`` for scaled), the ``condition`` under which ``algebra`` is exact
    (checked by the algebra, which declines otherwise), and the ``algebra`` itself."""

    name: str
    pattern: tuple[type, ...]
    condition: str
    algebra: Callable[..., Any]
    shape: Callable[..., ConvSpec] | None = None  # compose only: the predicted shape (estimate)


def _transposed_twice(a: ConvTransposeSpec, b: ConvTransposeSpec) -> Decline:
    return Decline(
        Reason.UNSUPPORTED,
        "a transposed conv after a transposed conv: convfuse has no rule composing them into one layer",
    )


def _ring_and_transposed(a: Map, b: Map) -> Decline:
    return Decline(
        Reason.UNSUPPORTED,
        "a conv with a border ring (padding case 2) next to a transposed conv: convfuse has no rule "
        "moving the ring through a transposed conv",
    )


COMPOSE: list[Rule] = [
    Rule(
        "conv then conv",
        (ConvSpec, ConvSpec),
        "ranks and channels agree; where b pads, a is pointwise with zero bias (DESIGN.md 2, padding "
        "cases 1-3); one padding mode; case 2 (a biased pointwise before a padded conv), where border "
        "merges are on, becomes a conv plus a border ring (border_map.compose_maps over algebra.compose)",
        bm.compose_maps,
        shape=estimate.compose_shape,
    ),
    Rule(
        "conv with a border ring then 1x1 conv / BN / affine",
        (BorderMap, ConvSpec),
        "b pointwise, stride 1, unpadded (else border-ring): the ring is mixed by b's weight",
        bm.compose_maps,
        shape=estimate.compose_shape,
    ),
    Rule(
        "anything then a conv with a border ring",
        (ConvSpec, BorderMap),
        "none: declined (border-ring; the ring lives on its own input's grid)",
        bm.compose_maps,
    ),
    Rule(
        "a conv with a border ring then a transposed conv",
        (BorderMap, ConvTransposeSpec),
        "no rule: declined (unsupported)",
        _ring_and_transposed,
    ),
    Rule(
        "a transposed conv then a conv with a border ring",
        (ConvTransposeSpec, BorderMap),
        "no rule: declined (unsupported)",
        _ring_and_transposed,
    ),
    Rule(
        "a conv with a border ring then another",
        (BorderMap, BorderMap),
        "none: declined (border-ring)",
        bm.compose_maps,
    ),
    Rule(
        "transposed conv then 1x1 conv / BN / affine",
        (ConvTransposeSpec, ConvSpec),
        "b is 1x1, stride 1, unpadded (else not-pointwise); any groups that nest (gcd); a depthwise b "
        "(BN, affine) is transpose_then_affine",
        tr.transpose_then_pointwise,
    ),
    Rule(
        "1x1 conv / BN / affine then transposed conv",
        (ConvSpec, ConvTransposeSpec),
        "a is 1x1, stride 1, unpadded (else not-pointwise); the weight part always folds; a non-zero "
        "bias or shift of a folds only where shift_response proves it one constant per channel on "
        "every output position for every input size (else shift-not-constant): the merged layer must be "
        "right wherever the model runs, so no static size is assumed",
        tr.pointwise_then_transpose,
    ),
    Rule(
        "transposed conv then transposed conv",
        (ConvTransposeSpec, ConvTransposeSpec),
        "no rule: declined (unsupported)",
        _transposed_twice,
    ),
]

ADD: list[Rule] = [
    Rule(
        "sum of convs",
        (ConvSpec,),
        "equal ranks, channels, strides and output grids (begin + end - extent); one padding mode",
        algebra.add,
    ),
    Rule(
        "sum of convs with border rings (and convs)",
        (BorderMap, ConvSpec),
        "those of algebra.add on the convs; the ring terms carried",
        bm.add_maps,
    ),
    Rule("sum of convs with border rings", (BorderMap,), "as above", bm.add_maps),
    Rule(
        "sum of transposed convs",
        (ConvTransposeSpec,),
        "equal ranks, channels and strides; equal output grids (slack)",
        tr.add_transposed,
    ),
    Rule(
        "sum of transposed convs and convs (1x1, identity)",
        (ConvSpec, ConvTransposeSpec),
        "as above, a conv counting as stride 1 (so only with stride-1 transposed convs), zero padded",
        tr.add_transposed,
    ),
]

CONCAT: list[Rule] = [
    Rule(
        "concat of convs",
        (ConvSpec,),
        "as the sum, output channels free",
        algebra.concat,
    ),
    Rule(
        "concat of convs with border rings (and convs)",
        (BorderMap, ConvSpec),
        "those of algebra.concat; each ring term placed in its rows",
        bm.concat_maps,
    ),
    Rule("concat of convs with border rings", (BorderMap,), "as above", bm.concat_maps),
    Rule(
        "concat of transposed convs",
        (ConvTransposeSpec,),
        "as the sum of transposed convs, output channels free",
        tr.concat_transposed,
    ),
    Rule(
        "concat of transposed convs and convs",
        (ConvSpec, ConvTransposeSpec),
        "as the mixed sum, output channels free",
        tr.concat_transposed,
    ),
]

SCALED: list[Rule] = [
    Rule("scaled conv", (ConvSpec,), "none (a per-channel affine with one scale)", algebra_linear.scaled),
    Rule("scaled transposed conv", (ConvTransposeSpec,), "none", tr.scaled_transposed),
    Rule("scaled conv with a border ring", (BorderMap,), "none (the ring terms scaled too)", bm.scale_map),
]


def _key(types: Sequence[type]) -> frozenset[type]:
    return frozenset(types)


_COMPOSE = {rule.pattern: rule for rule in COMPOSE}
_ADD = {_key(rule.pattern): rule for rule in ADD}
_CONCAT = {_key(rule.pattern): rule for rule in CONCAT}
_SCALED = {rule.pattern[0]: rule for rule in SCALED}


def _no_rule(what: str, parts: Sequence[Map]) -> Decline:
    names = sorted({TYPES[type(p)].name if type(p) in TYPES else type(p).__name__ for p in parts})
    return Decline(Reason.UNSUPPORTED, f"convfuse has no rule for the {what} of {' and '.join(names)}")


def identity(channels: int, ndim: int, dtype: Any) -> Map:
    """The region's input as a map of itself (a Dirac conv): the start of every series."""
    return algebra.identity(channels, ndim, dtype=dtype)


def compose(a: Map, b: Map) -> Map | Decline:
    """One map computing ``b(a(x))``, or why there is none (the entry for ``(type(a), type(b))``)."""
    rule = _COMPOSE.get((type(a), type(b)))
    if rule is None:
        return _no_rule("composition", (a, b))
    return rule.algebra(a, b)


def predicted(a: Map, b: Map) -> ConvSpec | None:
    """The shape of ``compose(a, b)`` predicted from geometry (weights not built), where the
    rule has a predictor and the operands fit; else None (the merge is judged once built)."""
    rule = _COMPOSE.get((type(a), type(b)))
    if rule is None or rule.shape is None:
        return None
    pa, pb = _type(a).conv_part(a), _type(b).conv_part(b)
    if pa is None or pb is None or pa.ndim != pb.ndim or pa.out_channels != pb.in_channels:
        return None
    return rule.shape(pa, pb)


def add(parts: Sequence[Map]) -> Map | Decline:
    """One map computing ``sum_i parts[i](x)`` (the entry for the set of part types)."""
    rule = _ADD.get(_key([type(p) for p in parts]))
    if rule is None:
        return _no_rule("sum", parts)
    return rule.algebra(list(parts))


def concat(parts: Sequence[Map]) -> Map | Decline:
    """One map computing the parts stacked on channels (the entry for the set of part types)."""
    rule = _CONCAT.get(_key([type(p) for p in parts]))
    if rule is None:
        return _no_rule("concatenation", parts)
    return rule.algebra(list(parts))


def scaled(m: Map, factor: float) -> Map | Decline:
    """``factor * m(x)`` (a subtracted or scaled branch)."""
    rule = _SCALED.get(type(m))
    if rule is None:
        return _no_rule("scaling", (m,))
    return rule.algebra(m, factor)


def rule_table() -> list[tuple[str, str, str, str, str]]:
    """Every entry as ``(operation, pattern, name, condition, algebra)`` (for docs and tests)."""

    def pattern(rule: Rule) -> str:
        return ", ".join(TYPES[t].name if t in TYPES else t.__name__ for t in rule.pattern)

    rows = []
    for op, rules in (("compose", COMPOSE), ("add", ADD), ("concat", CONCAT), ("scaled", SCALED)):
        for rule in rules:
            fn = rule.algebra
            rows.append((op, pattern(rule), rule.name, rule.condition, f"{fn.__module__}.{fn.__name__}"))
    return rows
