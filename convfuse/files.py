"""Merge or inspect an ONNX file: what ``convfuse merge`` and ``convfuse inspect`` do, as a library.

:func:`merge_file` loads, fuses, stages the result beside its target, verifies it against the
input, decides who is at fault when the check cannot run, and commits the staged file or rolls
it back. It returns a :class:`MergeResult` (the report, the typed :class:`Verification`, what was
written, the exit code); the CLI only prints it. Input that cannot be used at all raises a
:class:`~convfuse.errors.ConvfuseError` naming the file (``path``), as everywhere in convfuse;
:class:`OptionConflictError` is a combination of options that cannot hold together.

Messages name the options by their command-line spelling (``--no-verify``, ``--in-place``,
``--allow-unverified``), which are also this module's keyword arguments (``verify=False``...).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import onnx

from .errors import ConvfuseError, ExitCode, InvalidOptionError, NotRunnableError, OutputError
from .frontends.onnx.api import fuse_onnx
from .frontends.onnx.io import LoadedModel, check_file, external_data_name, is_large, read_model, stage_model
from .policy import Policy
from .report import Report
from .timing import DEFAULT_BUDGET
from .verify import VerifyResult, verify_onnx

__all__ = [
    "LARGE_BYTES",
    "LARGE_NODES",
    "MergeResult",
    "OptionConflictError",
    "Progress",
    "Verdict",
    "Verification",
    "check_merge",
    "check_paths",
    "default_output",
    "inspect_file",
    "merge_file",
]

#: Models this big get progress messages (the ``progress`` sink is told; smaller ones stay quiet).
LARGE_BYTES = 50 * 2**20
LARGE_NODES = 300

#: Receives one-line status messages.
Progress = Callable[[str], None]
Source = str | os.PathLike[str]


class OptionConflictError(InvalidOptionError):
    """Options that cannot be combined (``in_place`` with another output, or without verification)."""


class Verdict(Enum):
    """What the check of a merge found."""

    PASSED = "passed"
    FAILED = "failed"  # the candidate differs, or cannot be run where the input can
    NOT_RUN = "not-run"  # the input itself cannot be run here (custom operators, no size it runs at)
    SKIPPED = "skipped"  # not asked for (``verify=False``)


_VERDICT_EXIT = {
    Verdict.PASSED: ExitCode.OK,
    Verdict.SKIPPED: ExitCode.OK,
    Verdict.FAILED: ExitCode.VERIFY_FAILED,
    Verdict.NOT_RUN: ExitCode.UNVERIFIED,
}


@dataclass(frozen=True)
class Verification:
    """The check of a merge: its verdict, the report's one line, the finding, the verifier's result.

    ``detail`` is the line the report shows (``verified: candidate matches; ...``); ``finding`` is
    what was found without that prefix (for the one-line error of a failure); ``result`` is the
    verifier's answer, ``None`` when the check could not run or was skipped.
    """

    verdict: Verdict
    detail: str
    finding: str
    result: VerifyResult | None = None

    @property
    def exit_code(self) -> ExitCode:
        """0 passed or skipped, 1 failed, 4 not run (the input cannot be run here)."""
        return _VERDICT_EXIT[self.verdict]


@dataclass
class MergeResult:
    """What :func:`merge_file` did: the report, the check, where it wrote, how a command ends.

    ``written`` says whether ``target`` now holds the fused model; when it does not, ``error`` is
    the one-line cause (about ``source``). ``warnings`` are lines for stderr even on success (a
    model written unverified).
    """

    source: Path
    target: Path
    report: Report
    verification: Verification
    written: bool
    in_place: bool = False
    error: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> ExitCode:
        """The command's exit code: 0 written, else the verification's (1 failed, 4 not run)."""
        return ExitCode.OK if self.written else self.verification.exit_code


def default_output(model: Path) -> Path:
    """``dir/name.onnx`` -> ``dir/name.fused.onnx``."""
    return (
        model.with_name(model.stem + ".fused.onnx")
        if model.suffix == ".onnx"
        else model.with_name(model.name + ".fused.onnx")
    )


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))
    except OSError:
        return False


def _about(error: ConvfuseError, path: Path) -> ConvfuseError:
    """``error`` naming ``path`` when it names no file itself (same type, same message)."""
    return error if error.path is not None else type(error)(error.message, path=path)


def _target(model: Path, output: Path | None, in_place: bool, verify: bool, allow_unverified: bool) -> Path:
    """Where to write: never over the input unless ``in_place``, and only where writing can work."""
    if in_place:
        if output is not None and not _same_file(model, output):
            raise OptionConflictError("give either -o/--output or --in-place, not both")
        if not verify:
            raise OptionConflictError(
                "--in-place replaces the input only after verification; drop --no-verify"
            )
        if allow_unverified:
            raise OptionConflictError(
                "--in-place replaces the input only after verification; drop --allow-unverified"
            )
        return model
    target = output if output is not None else default_output(model)
    if _same_file(model, target):
        raise OutputError(
            "is the input file; choose another output, or replace the input with --in-place", path=target
        )
    if target.is_dir():
        raise OutputError("is a directory; give a file name", path=target)
    parent = target.parent if str(target.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"directory {parent} does not exist", path=target)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"directory {parent} is not writable", path=target)
    return target


def check_paths(
    src: Source,
    dst: Source | None = None,
    *,
    in_place: bool = False,
    verify: bool = True,
    allow_unverified: bool = False,
) -> Path:
    """The checks :func:`merge_file` makes before reading anything, in its order: the input file
    (exists, a readable non-empty model file), the options, then the output; the target path.
    Raises what :func:`merge_file` raises for them."""
    model = Path(src)
    check_file(model)  # the input's own problems first, before the output's
    return _target(model, None if dst is None else Path(dst), in_place, verify, allow_unverified)


def _load(path: Path, progress: Progress | None) -> tuple[LoadedModel, Progress | None]:
    """Read ``path``, and the progress sink to use for it (``None`` for a small model)."""
    try:
        big_file = path.is_file() and path.stat().st_size > LARGE_BYTES
    except OSError:
        big_file = False
    if big_file and progress is not None:
        progress(f"loading {path}")
    loaded = read_model(path)
    large = loaded.total_bytes > LARGE_BYTES or len(loaded.model.graph.node) > LARGE_NODES
    if loaded.total_bytes > LARGE_BYTES and progress is not None:
        progress(f"loaded {path} ({loaded.total_bytes / 2**20:,.0f} MiB)")
    return loaded, (progress if large else None)


def _fuse(
    path: Path,
    policy: Policy | str,
    device: str,
    latency_budget: float,
    keep_input: bool,
    progress: Progress | None,
) -> tuple[LoadedModel, onnx.ModelProto, Report, Progress]:
    """Load and fuse ``path``. ``keep_input=False``, or a model over 2 GiB, fuses the loaded
    model itself (``fused is loaded.model``): one copy of every weight in memory, not two. The
    latency policy always reports progress (timing takes seconds)."""
    loaded, say = _load(path, progress)
    if say is None and Policy.parse(policy) is Policy.LATENCY:
        say = progress
    inplace = not keep_input or is_large(loaded.model)
    try:
        fused, report = fuse_onnx(
            loaded,  # checked once, by read_model
            policy=policy,
            progress=say,
            device=device,
            latency_budget=latency_budget,
            inplace=inplace,
        )
    except ConvfuseError as exc:
        raise _about(exc, path) from None
    return loaded, fused, report, say or (lambda message: None)


def inspect_file(
    src: Source,
    *,
    policy: Policy | str = Policy.FLOPS,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    progress: Progress | None = None,
) -> Report:
    """What :func:`merge_file` would merge and decline in ``src``, writing nothing."""
    path = Path(src)
    return _fuse(path, policy, device, latency_budget, False, progress)[2]


def check_merge(
    reference: onnx.ModelProto | Path,
    candidate: onnx.ModelProto | Path,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> Verification:
    """Whether ``candidate`` computes what ``reference`` computes (:func:`convfuse.verify.verify_onnx`
    on CPU, two seeded random samples at each checked size, ``shapes`` for symbolic inputs). Models
    over 2 GiB are given as file paths (ONNX Runtime loads them with their external data).

    When the input itself cannot run (operators ONNX Runtime lacks, no input size it runs at) the
    merge is not verified, which is not a failure of the merge. When the check fails otherwise, the
    input is tried alone against itself: if it runs, the candidate is at fault (a failure).
    """
    try:
        result = verify_onnx(reference, candidate, shapes=shapes or None)
    except NotRunnableError as exc:
        detail = f"not verified: the input model cannot be run here ({exc})"
        return Verification(Verdict.NOT_RUN, detail, detail)
    except ConvfuseError as exc:
        try:
            verify_onnx(reference, reference, samples=1, attribution=False, shapes=shapes or None)
        except ConvfuseError as alone:
            detail = f"not verified: the input model cannot be run here ({alone})"
            return Verification(Verdict.NOT_RUN, detail, detail)
        detail = f"verification could not run the fused model ({exc}); use --no-verify to skip"
        return Verification(Verdict.FAILED, detail, detail)
    finding = result.finding()
    if not result.passed:
        finding += "; " + "; ".join(s.line() for s in result.suspects)
        return Verification(Verdict.FAILED, f"verified: {finding}", finding, result)
    return Verification(Verdict.PASSED, f"verified: {finding}", finding, result)


def merge_file(
    src: Source,
    dst: Source | None = None,
    *,
    in_place: bool = False,
    policy: Policy | str = Policy.FLOPS,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    verify: bool = True,
    shapes: Mapping[str, Sequence[int]] | None = None,
    allow_unverified: bool = False,
    progress: Progress | None = None,
) -> MergeResult:
    """Fuse the ONNX file ``src`` and write the result to ``dst`` (default ``NAME.fused.onnx``
    beside it), atomically and only once it verifies; ``in_place`` replaces ``src`` itself.

    The fused model is staged under a temporary name beside the target, checked against the input
    (:func:`check_merge`), then renamed into place; a failed check leaves nothing behind and the
    input is never modified. Where the input cannot be run here the result is not verified:
    nothing is written unless ``allow_unverified`` (never with ``in_place``).

    Raises :class:`~convfuse.errors.ConvfuseError` naming the file for unusable input or output
    (``path`` set) and :class:`OptionConflictError` for options that cannot be combined; every
    other outcome is in the returned :class:`MergeResult`.
    """
    model = Path(src)
    target = check_paths(model, dst, in_place=in_place, verify=verify, allow_unverified=allow_unverified)
    loaded, fused, report, say = _fuse(model, policy, device, latency_budget, verify, progress)
    if not in_place:
        data = target.parent / external_data_name(target)
        for used in loaded.data_files:
            if _same_file(used, target) or _same_file(used, data):
                raise OutputError(
                    f"writing it would overwrite {used}, which holds the input's external data", path=target
                )
    # The input in memory is kept only to verify against; a large one was fused in place and is
    # verified from its file, so that one copy of the weights is in memory at a time.
    reference: onnx.ModelProto | Path = loaded.model if fused is not loaded.model else model
    external, data_files = loaded.external_data, loaded.data_files
    del loaded
    say(f"writing {target} (temporary name until verified)")
    try:
        staged = stage_model(fused, target, external_data=True if external else None)
    except ConvfuseError as exc:
        raise _about(exc, target) from None
    candidate: onnx.ModelProto | Path = fused if isinstance(reference, onnx.ModelProto) else staged.path
    del fused
    result = MergeResult(model, target, report, Verification(Verdict.SKIPPED, "", ""), False, in_place)
    with staged:
        if verify:
            say("verifying")
            started = time.monotonic()
            result.verification = check_merge(reference, candidate, shapes)
            report.timings["verify"] = time.monotonic() - started
        else:
            result.verification = Verification(Verdict.SKIPPED, "verification skipped (--no-verify)", "")
        report.verification = result.verification.detail
        verdict, detail = result.verification.verdict, result.verification.detail
        if verdict is Verdict.FAILED:
            result.error = f"verification failed: {result.verification.finding}; nothing written"
            return result
        if verdict is Verdict.NOT_RUN:
            if in_place or not allow_unverified:
                why = (
                    "--in-place replaces the input only after verification"
                    if in_place
                    else "nothing written (--allow-unverified writes it anyway)"
                )
                result.error = f"{detail}; {why}"
                return result
            result.warnings.append(
                f"{model}: {detail}; written unverified (--allow-unverified): "
                "check it with `convfuse verify` where the input runs"
            )
        try:
            staged.commit()
        except ConvfuseError as exc:
            raise _about(exc, target) from None
    result.written = True
    if in_place:
        stale = [p for p in data_files if not _same_file(p, target.parent / external_data_name(target))]
        if stale:
            report.notes.append(
                f"{', '.join(str(p) for p in stale)}: no longer used by {target} (left in place)"
            )
    return result
