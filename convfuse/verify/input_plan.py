"""The input shapes the ONNX verifier runs at: declared, given with ``shapes``, or derived.

Plumbing between the model's ports, its geometry (:mod:`convfuse.frontends.onnx.geometry`) and
the size choice (:mod:`convfuse.sizes`). Symbolic dims get:

- the batch (axis 0 of an input of rank >= 2): :data:`~convfuse.sizes.BATCH` (2);
- channels (axis 1 of rank >= 3): what the first Conv or BatchNormalization reading it expects, else 1;
- spatial dims (axes 2 and up): two sizes from :func:`~convfuse.sizes.choose_sizes`' rules, the
  smallest every layer accepts and a larger one of the other parity; one symbol, one size;
- anything else: 1.

The runtime has the last word: :meth:`InputPlan.attempts` yields the derived sizes first and
then a bounded number of larger ones, for the caller to try until the reference runs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from ..errors import ConvfuseError, InternalError, InvalidModelError
from ..frontends.onnx.geometry import geometries, input_channels
from ..sizes import (
    BATCH,
    Fit,
    Geometry,
    NoSizeError,
    Status,
    group_status,
    pick_first,
    pick_second,
    progression,
)
from .inputs import InputSpec, Port, checked_dims, dims_text, fits

__all__ = ["ATTEMPTS", "InputPlan"]

#: Sizes tried at most for each of the two checks before the reference is called unrunnable.
ATTEMPTS = 8


@dataclass
class _Group:
    """Spatial dims sharing one size: (input index, spatial dim) members, and its status."""

    label: str
    members: list[tuple[int, int]]
    status: Status = field(default=lambda n: Fit.COVERED)
    first: int = 1


class InputPlan:
    """What to feed each input: one shape set, or two where spatial dims are symbolic.

    ``model`` is the reference (its graph gives the geometry); ``reference`` and ``candidate``
    are both models' declared inputs; ``shapes`` fixes some inputs' shapes (the ``--shape``
    option), which are then used as given.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        reference: Sequence[Port],
        candidate: Sequence[Port],
        shapes: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        shapes = dict(shapes or {})
        unknown = sorted(set(shapes) - {p.name for p in reference})
        if unknown:
            raise ConvfuseError(
                f"shape given for {', '.join(unknown)}, which is not a model input "
                f"(inputs: {', '.join(p.name for p in reference)})"
            )
        cand_by_name = {p.name: p for p in candidate}
        self.ports = list(reference)
        self.dims: list[list[int | str | None]] = []  # ints, and symbols where spatial sizes go
        self.declared: list[tuple[int | str | None, ...]] = []
        self.symbolic: list[list[tuple[int, str]]] = []  # per input: (axis, how it was set)
        self.groups: dict[str, _Group] = {}
        self.notes: list[str] = []
        values: dict[str, int] = {}
        layers: dict[int, list[Geometry]] = {}
        for index, port in enumerate(reference):
            declared = checked_dims(port, cand_by_name[port.name])
            if port.name in shapes:
                given = tuple(int(d) for d in shapes[port.name])
                if not fits(given, declared):
                    raise ConvfuseError(
                        f"shape {dims_text(given)} for input '{port.name}' does not fit its declared shape "
                        f"{dims_text(declared or ())}"
                    )
                self.dims.append(list(given))
                self.declared.append(given)
                self.symbolic.append([])
                continue
            if declared is None:
                raise InvalidModelError(f"input '{port.name}' has no declared shape; give one with --shape")
            dims: list[int | str | None] = list(declared)
            symbolic = []
            rank = len(dims)
            for axis, d in enumerate(declared):
                if isinstance(d, int):
                    continue
                if axis >= 2 and rank >= 3:
                    key = d or f"{port.name}:{axis}"
                    group = self.groups.setdefault(key, _Group(_axis_label(port.name, axis, d), []))
                    group.members.append((index, axis - 2))
                    layers.setdefault(index, [])
                    symbolic.append((axis, "spatial"))
                    continue
                if d and d in values:
                    dims[axis] = values[d]
                    symbolic.append((axis, f"{values[d]}, as elsewhere"))
                    continue
                if axis == 0 and rank >= 2:
                    value, how = BATCH, f"{BATCH} (batch)"
                elif axis == 1 and rank >= 3:
                    channels = input_channels(model, port.name)
                    value, how = (
                        (channels, f"{channels} (what its first layer reads)") if channels else (1, "1")
                    )
                else:
                    value, how = 1, "1"
                dims[axis] = value
                if d:
                    values[d] = value
                symbolic.append((axis, how))
            self.dims.append(dims)
            self.declared.append(tuple(declared))
            self.symbolic.append(symbolic)
        for index in layers:
            layers[index] = geometries(model, reference[index].name, len(self.dims[index]) - 2)
        for group in self.groups.values():
            group.status = group_status([(layers[i], d) for i, d in group.members])
            first = pick_first(group.status)
            if first is None:
                raise NoSizeError(
                    f"input {group.label}: no size up to the search limit passes every layer of the graph"
                )
            group.first = first
        self._second_notes: list[str] = []

    @property
    def sizes(self) -> int:
        """How many shape sets to check at: 2 where spatial dims are derived, else 1."""
        return 2 if self.groups else 1

    @property
    def derived(self) -> bool:
        """Whether any dim was chosen here rather than declared or given."""
        return any(self.symbolic)

    def first(self) -> list[InputSpec]:
        """The derived first shape set, untried."""
        return self._specs({k: g.first for k, g in self.groups.items()})

    def attempts(self, index: int, first: Sequence[InputSpec] | None = None) -> Iterator[list[InputSpec]]:
        """Shape sets to try for check ``index`` (0 or 1), best first, at most :data:`ATTEMPTS`.

        Check 1 needs the shape set check 0 ran at (``first``): its sizes are larger, the first
        half of the tries of the other parity (:func:`~convfuse.sizes.pick_second`), the rest any
        larger size; none where no larger size is accepted.
        """
        if not self.groups:
            yield self._specs({})
            return
        runs: dict[str, list[int]] = {}
        self._second_notes = []
        for key, group in self.groups.items():
            if index == 0:
                runs[key] = list(progression(group.status, group.first, ATTEMPTS))
                continue
            if first is None:  # the first size is always settled before the second is planned
                raise InternalError("the second input size was planned before the first")
            i, dim = group.members[0]
            ran = first[i].shape[dim + 2]
            second, note = pick_second(group.status, ran)
            if note:
                self._second_notes.append(f"input {group.label}: {note}")
            # Half the tries keep the ideal parity; then any larger size (a constraint the
            # geometry missed may allow only one parity).
            keep = progression(group.status, second, ATTEMPTS // 2, parity=second % 2)
            larger = [n for n in (*keep, *progression(group.status, ran + 1, ATTEMPTS)) if n > ran]
            runs[key] = list(dict.fromkeys(larger))[:ATTEMPTS]
        for step in range(ATTEMPTS):
            if all(step >= len(r) for r in runs.values()):
                return  # (a group that ran out keeps its last size)
            yield self._specs({k: r[min(step, len(r) - 1)] for k, r in runs.items() if r})

    def _specs(self, sizes: Mapping[str, int]) -> list[InputSpec]:
        by_member = {m: sizes[k] for k, g in self.groups.items() if k in sizes for m in g.members}
        specs = []
        for index, port in enumerate(self.ports):
            shape = tuple(
                int(by_member.get((index, axis - 2), d if isinstance(d, int) else 1))
                for axis, d in enumerate(self.dims[index])
            )
            specs.append(InputSpec(port.name, port.dtype, shape))
        return specs

    def describe(self, used: Sequence[Sequence[InputSpec]]) -> list[str]:
        """Notes saying how each symbolic input was set and at which shapes it ran (``used``)."""
        notes = list(self.notes)
        for index, port in enumerate(self.ports):
            symbolic = self.symbolic[index]
            if not symbolic:
                continue
            declared = self.declared[index]
            axes = ", ".join(
                f"{axis} ({declared[axis]})" if isinstance(declared[axis], str) else str(axis)
                for axis, _ in symbolic
            )
            shapes = " and ".join(dict.fromkeys(dims_text(specs[index].shape) for specs in used))
            parts = [f"axis {axis}: {h}" for axis, h in symbolic if h != "spatial"]
            spatial = [str(axis) for axis, h in symbolic if h == "spatial"]
            if spatial:
                parts.append(
                    f"ax{'es' if len(spatial) > 1 else 'is'} {', '.join(spatial)}: derived from the "
                    "graph, the smallest size every layer accepts and a larger one of the other parity"
                )
            how = "; ".join(parts)
            notes.append(
                f"input '{port.name}' has symbolic dims at axes {axes}: ran at {shapes} ({how}; "
                f"choose with --shape {port.name}=DIMS, or shapes= in Python)"
            )
        return notes + self._second_notes


def _axis_label(name: str, axis: int, symbol: str | None) -> str:
    return f"'{name}' axis {axis}" + (f" ({symbol})" if symbol else "")
