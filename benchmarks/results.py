"""What one benchmark run measured: options, per-model results, variant names and targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import passcost
from .timing import Timing

__all__ = [
    "AA",
    "CHAIN_FRACTION",
    "MAX_REL_ERR",
    "PASS_MEMORY_RATIO",
    "PASS_TIME_RATIO",
    "PEERS",
    "SLOWER_TOLERANCE",
    "VARIANTS",
    "VARIANTS_TIMED",
    "ModelResult",
    "Options",
    "Results",
]

#: ORT variants: key -> (label, ORT optimization level). Tool outputs run with ORT optimizations
#: disabled, like the original, so that the table shows what each tool did by itself.
VARIANTS: dict[str, tuple[str, str]] = {
    "original": ("original", "disabled"),
    "ort": ("ORT-opt", "all"),
    "onnxsim": ("onnxsim", "disabled"),
    "onnxoptimizer": ("onnxoptimizer", "disabled"),
    "convfuse": ("convfuse", "disabled"),
    "convfuse+ort": ("convfuse+ORT-opt", "all"),
}
PEERS = ("onnxsim", "onnxoptimizer")
#: A second, identical session of the original, timed with the others: its ratio to the
#: original is the noise floor of the comparison (an A/A test).
AA = "original-copy"
VARIANTS_TIMED = {**VARIANTS, AA: ("original (A/A copy)", "disabled")}

#: Target thresholds (reported, never asserted).
CHAIN_FRACTION = 0.8  # ExpandNet speed-up >= 0.8 x MAC ratio
SLOWER_TOLERANCE = 0.03  # "slower" = more than 3 % slower than the reference (timer noise)
PASS_TIME_RATIO = 2.0  # convfuse file-to-file <= 2 x bare load + save
PASS_MEMORY_RATIO = 3.0  # peak memory increase < 3 x model file size
MAX_REL_ERR = 1e-4  # DESIGN.md section 4: above this is a bug


# --------------------------------------------------------------------------- results
@dataclass
class ModelResult:
    """Everything measured for one benchmark model."""

    name: str
    family: str
    description: str
    file_bytes: int
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # variant -> op family -> n
    macs: dict[str, int | None] = field(default_factory=dict)
    rel_err: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # variant (or "torch") -> message
    ort: dict[int, dict[str, Timing]] = field(default_factory=dict)  # threads -> variant -> timing
    eager: dict[int, dict[str, Timing]] = field(default_factory=dict)
    eager_rel_err: float | None = None
    background: float | None = None  # cores other processes kept busy while this model was timed
    merges: int | None = None
    declines: dict[str, int] = field(default_factory=dict)
    passes: dict[str, passcost.PassCost] = field(default_factory=dict)
    pass_in_process: bool = True


@dataclass
class Options:
    """What to run (see :func:`parse_args`)."""

    models: list[str]
    threads: list[int]
    reps: int
    pass_reps: int
    large: list[str]
    peers: bool
    torch: bool
    sample_s: float
    workdir: Path | None
    output: Path | None


@dataclass
class Results:
    """All measurements of one run and the Markdown that reports them."""

    options: Options
    machine: dict[str, str]
    models: list[ModelResult]
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end
    cores: int = 1  # cores this process may run on
    markdown: str = ""

    @property
    def failures(self) -> list[str]:
        """Every variant that could not be produced, run or timed, as ``model/variant: message``."""
        return [f"{m.name}/{v}: {e}" for m in self.models for v, e in m.errors.items()]
