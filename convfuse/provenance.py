"""Where a merged layer came from: the merge kind and the original layers it replaces.

Both front ends write it into the model they return, so that a graph viewer (ONNX) or
``print(model)`` (torch) traces a merged conv back to its sources:

- ONNX: the merged node's ``metadata_props`` hold :data:`KIND_KEY` (a :class:`MergeKind`
  value), :data:`DETAIL_KEY` (the front end's detailed kind, e.g. ``bn+conv+bn``) and
  :data:`SOURCES_KEY` (a JSON list of ``{"name", "op_type"}``), and its ``doc_string`` says the
  same in words (:func:`describe`);
- torch: the merged module's ``convfuse_provenance`` attribute and its ``extra_repr``.

A merge of merges (conv+bn, then the sum of branches it is in) lists the original layers, not
the intermediate ones. Text only: no graph or tensor types here, and the same input always
gives the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from .report import MergeKind

__all__ = ["DETAIL_KEY", "KIND_KEY", "SOURCES_KEY", "Provenance", "describe"]

KIND_KEY = "convfuse.merge_kind"
DETAIL_KEY = "convfuse.merge_detail"
SOURCES_KEY = "convfuse.replaces"


@dataclass(frozen=True)
class Provenance:
    """A merged layer's kind and the ``(name, op_type)`` of every original layer it replaces
    (``op_type`` is ``""`` where the front end does not know it)."""

    detail: str
    sources: tuple[tuple[str, str], ...]

    @property
    def kind(self) -> MergeKind:
        return MergeKind.of(self.detail)

    def properties(self) -> dict[str, str]:
        """The metadata entries, in a fixed order with a fixed encoding."""
        sources = [{"name": name, "op_type": op} for name, op in self.sources]
        return {
            KIND_KEY: self.kind.value,
            DETAIL_KEY: self.detail,
            SOURCES_KEY: json.dumps(sources, separators=(",", ":"), ensure_ascii=False),
        }

    @classmethod
    def from_properties(cls, props: Mapping[str, str]) -> Provenance | None:
        """What :meth:`properties` wrote, or ``None`` when the entries are absent or unreadable."""
        if SOURCES_KEY not in props or DETAIL_KEY not in props:
            return None
        try:
            sources = json.loads(props[SOURCES_KEY])
            pairs = tuple((str(s["name"]), str(s.get("op_type", ""))) for s in sources)
        except (ValueError, TypeError, KeyError):
            return None
        return cls(props[DETAIL_KEY], pairs)


def describe(p: Provenance) -> str:
    """One sentence for a viewer: ``convfuse: conv+bn merge (bn+conv+bn) of 3 layers: ...``."""
    detail = f" ({p.detail})" if "+" in p.detail and p.detail != p.kind.value else ""
    layers = ", ".join(f"{op} '{name}'" if op else f"'{name}'" for name, op in p.sources)
    plural = "s" if len(p.sources) != 1 else ""
    return f"convfuse: {p.kind.value} merge{detail} of {len(p.sources)} layer{plural}: {layers}"
