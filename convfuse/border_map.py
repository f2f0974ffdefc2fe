"""A tensor as a conv of the region input plus a constant border ring, and how it combines (issue 14).

The planner gives every tensor of a region a map of its input ``x``. After a case-2 step (a
conv ``B`` that zero-pads the output of a biased pointwise ``A``, DESIGN.md section 2) the map
is no longer one conv: it is ``y = spec(x) + ring(n)`` with ``ring`` an input-independent
constant that depends on ``x``'s spatial size ``n`` (:mod:`convfuse.border`). :class:`BorderMap`
is that value; the rules below say which further steps keep it exact. Each states pattern,
conditions and algebra; the planner calls them through :func:`compose_maps`, :func:`add_maps`,
:func:`scale_map` and :func:`concat_maps`, which fall back to the plain rules of
:mod:`convfuse.algebra` when no border map is involved.

The ring is a sum of terms ``P_t @ R_t(n)``: ``R_t`` the ring of one case-2 merge (channels
``Co_t``), ``P_t[Co, Co_t]`` the pointwise mixing applied since (``None``: identity).

Numpy float64 throughout, like :mod:`convfuse.border`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np

from .algebra import Cost, add, compose, concat
from .algebra_linear import scaled
from .border import BorderMerge, border_ring, compose_across_border, ring_conv
from .decline import Decline, Reason
from .spec import ConvSpec
from .transpose import _f64

__all__ = [
    "BorderMap",
    "Correction",
    "RingTerm",
    "add_maps",
    "border_merges",
    "compose_maps",
    "concat_maps",
    "correction_options",
    "scale_map",
]

#: Whether case 2 is merged with a border correction (off: the case-1-only planner, for benchmarks).
_ENABLED: ContextVar[bool] = ContextVar("convfuse_border_merges", default=True)


@contextmanager
def border_merges(enabled: bool) -> Iterator[None]:
    """Plan with border corrections on or off inside the ``with`` block (off: case 2 declines)."""
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


# --------------------------------------------------------------------------- the value
@dataclass(frozen=True, eq=False)
class RingTerm:
    """``mix @ ring(merge)``: one case-2 merge's ring, mixed by later pointwise layers."""

    merge: BorderMerge
    mix: np.ndarray | None = None  # [Co, Co_merge] float64; None: identity

    @property
    def channels(self) -> int:
        return int(self.merge.core.shape[0] if self.mix is None else self.mix.shape[0])

    def mixed(self, matrix: np.ndarray) -> RingTerm:
        return RingTerm(self.merge, matrix if self.mix is None else matrix @ self.mix)

    def core(self) -> np.ndarray:
        """The mixed Tucker core ``P @ M``: ``[Co, *kB]`` float64."""
        m = self.merge.core
        if self.mix is None:
            return m
        return np.tensordot(self.mix, m, axes=([1], [0]))

    def interior(self) -> np.ndarray:
        k = self.merge.interior
        return k if self.mix is None else self.mix @ k


@dataclass(frozen=True, eq=False)
class BorderMap:
    """``y = spec(x) + sum_t terms[t](n)``: exact for every input size (interior in spec's bias)."""

    spec: ConvSpec
    terms: tuple[RingTerm, ...]

    def ring(self, spatial: Sequence[int]) -> np.ndarray:
        """The dense correction ``[Co, *out]`` (float64) for input spatial size ``spatial``."""
        out = None
        for t in self.terms:
            r = border_ring(t.merge, spatial)
            r = r if t.mix is None else np.tensordot(t.mix, r, axes=([1], [0]))
            out = r if out is None else out + r
        assert out is not None
        return out

    def ring_convs(self) -> list[ConvSpec] | Decline:
        """The ring at run time: convs of ``ones[1, 1, *x.spatial]`` whose outputs sum to it.

        One conv per ring geometry (terms of equal geometry share it, their mixed cores
        summed). Declines where a term's first conv is not pointwise and unpadded
        (:func:`~convfuse.border.ring_conv` on ``x``'s grid).
        """
        by_geometry: dict[tuple[object, ...], ConvSpec] = {}
        for t in self.terms:
            rc = ring_conv(t.merge, on_input_grid=True)
            if isinstance(rc, Decline):
                return rc
            core, interior = t.core(), t.interior()
            weight = core.reshape(core.shape[0], 1, *core.shape[1:])
            key = (rc.kernel_size, rc.stride, rc.dilation, rc.pads, rc.padding_mode)
            if key in by_geometry:
                prev = by_geometry[key]
                weight, bias = _f64(prev.weight) + weight, _f64(prev.bias) - interior
            else:
                bias = -interior
            by_geometry[key] = rc.replace(weight=weight, bias=bias)
        return list(by_geometry.values())


Map = ConvSpec | BorderMap


def _ring_decline(message: str) -> Decline:
    return Decline(Reason.BORDER_RING, message)


def _passes_ring(spec: ConvSpec) -> bool:
    """Layers the ring passes through exactly: pointwise, stride 1, unpadded (1x1, BN, affine)."""
    return spec.is_pointwise and not spec.is_padded and all(s == 1 for s in spec.stride)


def _dense_matrix(spec: ConvSpec) -> np.ndarray:
    """A pointwise conv's weight as a dense ``[Co, Ci]`` float64 matrix (groups block-diagonal)."""
    w = _f64(spec.weight).reshape(spec.out_channels, -1)  # [Co, Ci/g]
    g, co_g, ci_g = spec.groups, spec.out_channels // spec.groups, w.shape[1]
    dense = np.zeros((spec.out_channels, spec.in_channels))
    for k in range(g):
        dense[k * co_g : (k + 1) * co_g, k * ci_g : (k + 1) * ci_g] = w[k * co_g : (k + 1) * co_g]
    return dense


# --------------------------------------------------------------------------- rules
def compose_maps(a: Map, b: Map) -> Map | Decline:
    """``a`` then ``b``.

    - Two convs: :func:`~convfuse.algebra.compose`; where it declines case 2
      (``padded-after-biased-pointwise``) and border merges are on,
      :func:`~convfuse.border.compose_across_border`: the conv plus one ring term.
    - Border map then a conv. Pattern: a 1x1 conv, BN or per-channel affine after it.
      Conditions: ``b`` pointwise, stride 1, unpadded. Algebra: ``b(spec x + R) = (b o spec)(x) +
      Wb R`` (``b``'s bias goes into the composed conv; the ring is mixed by ``b``'s weight only,
      ``Wb`` dense over groups). Anything spatial, strided or padded after it: ``border-ring``.
    - A border map after anything: ``border-ring`` (its ring lives on its own input's grid).
    """
    if isinstance(b, BorderMap):
        return _ring_decline(
            "a border-corrected merge (case 2) can only start a merged run: the layers before it "
            "would move its ring onto another grid"
        )
    if isinstance(a, BorderMap):
        if not _passes_ring(b):
            return _ring_decline(
                f"a conv with kernel {b.kernel_size}, stride {b.stride}, pads {b.pads} after a "
                "border-corrected merge (case 2): the constant ring is not constant through it; "
                "only pointwise, stride-1, unpadded layers (1x1, BN, affine) may follow"
            )
        spec = compose(a.spec, b)
        if isinstance(spec, Decline):
            return spec
        matrix = _dense_matrix(b)
        return BorderMap(spec, tuple(t.mixed(matrix) for t in a.terms))
    merged = compose(a, b)
    if not (isinstance(merged, Decline) and merged.reason is Reason.PADDED_AFTER_BIASED_POINTWISE):
        return merged
    if not _ENABLED.get():
        return merged
    border = compose_across_border(a, b)
    if isinstance(border, Decline):
        return border
    if not np.any(border.core):
        return border.spec  # B reads none of A's bias: the ring is zero
    return BorderMap(border.spec, (RingTerm(border),))


def scale_map(m: Map, factor: float) -> Map | Decline:
    """``factor * m``: the conv scaled (:func:`~convfuse.algebra_linear.scaled`), every ring term's
    mix times ``factor``."""
    if not isinstance(m, BorderMap):
        return scaled(m, factor)
    spec = scaled(m.spec, factor)
    if isinstance(spec, Decline):
        return spec
    eye = np.eye(m.spec.out_channels) * float(factor)
    return BorderMap(spec, tuple(t.mixed(eye) for t in m.terms))


def add_maps(parts: Sequence[Map]) -> Map | Decline:
    """Parallel sum. Pattern: border maps and plain convs of one input summed. Conditions:
    those of :func:`~convfuse.algebra.add` on the conv parts (same output grid for every input
    size, so every ring term is on the sum's grid). Algebra: ``sum_i (spec_i x + R_i) = (sum_i
    spec_i)(x) + sum_i R_i``: the convs added, the ring terms carried."""
    if not any(isinstance(p, BorderMap) for p in parts):
        return add(parts)  # type: ignore[arg-type]
    spec = add([p.spec if isinstance(p, BorderMap) else p for p in parts])
    if isinstance(spec, Decline):
        return spec
    return BorderMap(spec, tuple(t for p in parts if isinstance(p, BorderMap) for t in p.terms))


def concat_maps(parts: Sequence[Map]) -> Map | Decline:
    """Concatenation on channels. Conditions: those of :func:`~convfuse.algebra.concat`. Algebra:
    the convs stacked; each part's ring terms mixed into its rows of the output (a 0/1 matrix)."""
    if not any(isinstance(p, BorderMap) for p in parts):
        return concat(parts)  # type: ignore[arg-type]
    specs = [p.spec if isinstance(p, BorderMap) else p for p in parts]
    spec = concat(specs)
    if isinstance(spec, Decline):
        return spec
    terms: list[RingTerm] = []
    row = 0
    for p, s in zip(parts, specs):
        if isinstance(p, BorderMap):
            place = np.zeros((spec.out_channels, s.out_channels))
            place[row : row + s.out_channels] = np.eye(s.out_channels)
            terms += [t.mixed(place) for t in p.terms]
        row += s.out_channels
    return BorderMap(spec, tuple(terms))


# --------------------------------------------------------------------------- cost and form
@dataclass(frozen=True, eq=False)
class Correction:
    """How a merge writes its ring: ``form`` ``"dense"`` (a constant ``[1, Co, *out]`` for input
    size ``spatial``, added) or ``"ones"`` (``convs`` of a ones map of ``x``'s shape, added: a
    constant ones map of size ``spatial`` where it is set, else built at run time); ``cost``: what
    it adds per output position (MACs: the Add's elements and the ones-map convs; parameters: the
    constant, or the ones-map conv weights and the constant ones map)."""

    map: BorderMap
    form: str
    cost: Cost
    spatial: tuple[int, ...] | None = None
    convs: tuple[ConvSpec, ...] = ()

    @property
    def nodes(self) -> int:
        """Graph nodes the ring adds where it is written as nodes (ONNX): the Add; the ones-map
        form a Conv and an Add per ring conv, and when the size is dynamic Shape, Slice, Concat and
        ConstantOfShape."""
        if self.form == "dense":
            return 1
        return 2 * len(self.convs) + (4 if self.spatial is None else 0)

    @property
    def note(self) -> str:
        co = self.map.spec.out_channels
        if self.form == "dense":
            out = self.map.terms[0].merge.out_size(self.spatial or ())
            shape = "x".join(str(d) for d in (co, *out))
            return f"padding case 2: merged with a border correction (a constant {shape} ring, added)"
        ones = "a constant ones map" if self.spatial is not None else "a ones map of the input's shape"
        return (
            f"padding case 2: merged with a border correction (the ring as {len(self.convs)} "
            f"one-channel conv(s) of {ones}, added)"
        )


def correction_options(
    m: BorderMap, spatial: Sequence[int | None] | None, as_nodes: bool = False
) -> list[Correction] | Decline:
    """The ways to write ``m``'s ring, best first: dense when the input size is known, then the
    ones-map form where it exists. A decline when neither is available (dynamic size after a
    first conv that is not pointwise and unpadded).

    ``as_nodes`` (the ring written as graph nodes, ONNX): for a known size the ones map is a
    constant ``[1, 1, *x.spatial]`` (its elements counted as parameters; a runtime folds the
    ring convs of it at load), else built from the input's shape at run time."""
    co = m.spec.out_channels
    options: list[Correction] = []
    static = spatial is not None and all(d is not None for d in spatial)
    size = tuple(int(d) for d in spatial) if static else ()  # type: ignore[union-attr, arg-type]
    if static:
        out = m.terms[0].merge.out_size(size)
        options.append(Correction(m, "dense", Cost(co, co * math.prod(out)), size))
    convs = m.ring_convs()
    if not isinstance(convs, Decline):
        macs = co + sum(c.macs_per_position() for c in convs)
        params = sum(c.params() for c in convs)
        if static and as_nodes:
            params += math.prod(size)
        at = size if static and as_nodes else None
        options.append(Correction(m, "ones", Cost(macs, params), at, tuple(convs)))
    elif not options:
        return Decline(
            Reason.PADDED_AFTER_BIASED_POINTWISE,
            f"case 2 needs a border correction: the input size is not known and the ring has no "
            f"run-time form ({convs.message})",
        )
    return options
