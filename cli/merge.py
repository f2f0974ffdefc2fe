"""``convfuse merge MODEL.onnx [-o OUT.onnx]``: fuse, check, write atomically, report.

Exit codes: 0 done, 1 verification failed (nothing written), 2 bad input or usage.
"""

from __future__ import annotations

from pathlib import Path

import click
import onnx

from convfuse.errors import ConvfuseError
from convfuse.frontends.onnx_io import MAX_PROTOBUF, save_model
from convfuse.verify import verify_onnx

from . import _run
from .options import EXIT_VERIFY_FAILED, json_option, model_argument, output_option, policy_option, verify_option

__all__ = ["merge", "default_output"]


def default_output(model: Path) -> Path:
    """``dir/name.onnx`` -> ``dir/name.fused.onnx``."""
    return model.with_name(model.stem + ".fused.onnx") if model.suffix == ".onnx" else model.with_name(model.name + ".fused.onnx")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.exists() and a.samefile(b))
    except OSError:
        return False


@click.command("merge", short_help="Fuse a model and write the result.")
@model_argument
@output_option
@policy_option
@json_option
@verify_option
def merge(
    model: Path, output: Path | None, policy: str, device: str, latency_budget: float, as_json: bool, verify: bool
) -> None:
    """Merge linear runs in MODEL.onnx into single convolutions and write the fused model.

    Writes MODEL.fused.onnx beside the input unless -o is given; the input is never modified.
    Exit codes: 0 done, 1 verification failed (nothing written), 2 bad input or usage.
    """
    target = output if output is not None else default_output(model)
    if _same_file(model, target):
        _run.fail(target, "is the input file; choose another output (the input is never overwritten)")
    if target.is_dir():
        _run.fail(target, "is a directory; give a file name")
    if not target.parent.is_dir():
        _run.fail(target, f"directory {target.parent} does not exist")
    loaded, fused, report = _run.fuse(model, policy, device, latency_budget)
    extra = {"input": str(model), "output": None}
    if verify:
        passed, detail = _verify(loaded.model, fused)
        report.notes.append(detail)
        if not passed:
            _run.emit(report, as_json, extra)
            cause = detail.removeprefix("verified: ")
            _run.fail(model, f"verification failed: {cause}; nothing written", EXIT_VERIFY_FAILED)
    else:
        report.notes.append("verification skipped (--no-verify)")
    try:
        save_model(fused, target, external_data=True if loaded.external_data else None)
    except ConvfuseError as exc:
        _run.fail(target, exc)
    extra["output"] = str(target)
    _run.emit(report, as_json, extra, lines=(f"wrote {target}",))


def _verify(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> tuple[bool, str]:
    """Whether ``candidate`` computes what ``reference`` computes (:func:`convfuse.verify.verify_onnx`
    on CPU, two seeded random samples), and the verdict on one line."""
    if reference.ByteSize() > MAX_PROTOBUF or candidate.ByteSize() > MAX_PROTOBUF:
        return True, "verification skipped: model over 2 GiB; run `convfuse verify` on the written files"
    try:
        result = verify_onnx(reference, candidate)
    except ConvfuseError as exc:
        return False, f"verification could not run the models ({exc}); use --no-verify to skip"
    detail = result.summary()
    if not result.passed:
        detail += "; " + "; ".join(s.line() for s in result.suspects)
    return result.passed, detail
