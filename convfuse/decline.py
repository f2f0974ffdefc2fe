"""Why a merge did not happen: a typed value, never a silent skip.

Rules return a :class:`Decline` for an ordinary unmergeable case; front ends add their own
reasons (a tensor used twice, a weight that is not constant) from the same :class:`Reason` table
so that reports and JSON output speak one vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Reason", "Decline"]


class Reason(str, Enum):
    """Reason codes; the value is the stable string used in reports and JSON."""

    # Padding cases of DESIGN.md section 2 (B pads the output of A).
    PADDED_AFTER_BIASED_POINTWISE = "padded-after-biased-pointwise"  # case 2
    PADDED_AFTER_SPATIAL = "padded-after-spatial"  # case 3
    PADDING_MODE = "padding-mode"  # the later conv pads with reflect/replicate/circular
    MIXED_PADDING_MODES = "mixed-padding-modes"
    BORDER_RING = "border-ring"  # a layer after a case-2 merge that its constant ring does not pass
    # Shapes and geometry.
    RANK_MISMATCH = "rank-mismatch"
    CHANNEL_MISMATCH = "channel-mismatch"
    STRIDE_MISMATCH = "stride-mismatch"
    GRID_MISMATCH = "grid-mismatch"
    TOO_LARGE = "too-large"
    # Policy.
    NOT_PROFITABLE = "not-profitable"
    # Graph-level reasons (front ends).
    TRAINING_MODE = "training-mode"
    NON_CONSTANT = "non-constant"
    SHARED_TENSOR = "shared-tensor"
    GRAPH_OUTPUT = "graph-output"
    UNSUPPORTED = "unsupported"
    NON_FINITE = "non-finite"
    DTYPE = "dtype"
    UNTRACEABLE = "untraceable"
    NOTHING_TO_MERGE = "nothing-to-merge"  # no linear op next to the layer that convfuse reads
    SELF_CHECK = "self-check"  # the fused module raised or differed when run next to the original
    # Transposed convolutions (convfuse.transpose).
    SHIFT_NOT_CONSTANT = "shift-not-constant"  # a shift before a ConvTranspose varies over its output
    NOT_POINTWISE = "not-pointwise"  # the conv next to a ConvTranspose is not 1x1, stride 1, unpadded
    # Pre-passes (ONNX constant folding, bias-filled borders).
    QUANTIZED = "quantized"  # a QuantizeLinear/DequantizeLinear: the runtime's contract, never folded
    NONDETERMINISTIC = "nondeterministic"  # a random op: not the same value on every run
    BORDER_INCOMPLETE = "border-incomplete"  # a padded ring not entirely written (or writes inside it)
    BORDER_VALUE = "border-value"  # ring values differ from what the layer before maps zero to


@dataclass(frozen=True)
class Decline:
    """A merge that was not made, with a reason code and a sentence a user can read."""

    reason: Reason
    message: str

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"
