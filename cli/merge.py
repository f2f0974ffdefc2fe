"""``convfuse merge MODEL.onnx [-o OUT.onnx]``: fuse, check, write atomically, report.

Exit codes: 0 done, 1 verification failed (nothing written), 2 bad input or usage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click
import onnx

from convfuse.errors import ConvfuseError
from convfuse.frontends.onnx_io import MAX_PROTOBUF, save_model

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
def merge(model: Path, output: Path | None, policy: str, as_json: bool, verify: bool) -> None:
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
    loaded, fused, report = _run.fuse(model, policy)
    extra = {"input": str(model), "output": None}
    if verify:
        verdict = _verify(loaded.model, fused)
        report.notes.append(f"verification: {verdict.detail}")
        if not verdict:
            _run.emit(report, as_json, extra)
            _run.fail(model, f"verification failed: {verdict.detail}; nothing written", EXIT_VERIFY_FAILED)
    else:
        report.notes.append("verification: skipped (--no-verify)")
    try:
        save_model(fused, target, external_data=True if loaded.external_data else None)
    except ConvfuseError as exc:
        _run.fail(target, exc)
    extra["output"] = str(target)
    _run.emit(report, as_json, extra, lines=(f"wrote {target}",))


# ================================================================================================
# VERIFICATION SEAM. A minimal stand-in for the project's verifier (convfuse.verify): run both
# models on one seeded random input and compare. Replace the body of `_verify` with a call to
# the verifier when the branches are merged; `merge` only relies on the signature and on the
# result being truthy when the models agree.
# ================================================================================================
@dataclass(frozen=True)
class Verdict:
    """Whether the candidate computes what the reference computes, and a line saying how sure."""

    ok: bool
    detail: str

    def __bool__(self) -> bool:
        return self.ok


def _verify(reference: onnx.ModelProto, candidate: onnx.ModelProto) -> Verdict:
    """Compare the outputs of ``reference`` and ``candidate`` on one random input.

    ONNX Runtime (CPU) runs them; models it has no kernels for (float64 Conv) fall back to the
    ONNX reference evaluator. Tolerance is relative to the largest output: 1e-4 float32, 1e-2
    float16, 1e-9 float64.
    """
    import numpy as np
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    if reference.ByteSize() > MAX_PROTOBUF or candidate.ByteSize() > MAX_PROTOBUF:
        return Verdict(True, "skipped: model over 2 GiB (compare the files with a verifier)")
    initializers = {t.name for t in reference.graph.initializer}
    rng = np.random.default_rng(0)
    feeds = {}
    for vi in reference.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (1 if k == 0 else 32) for k, d in enumerate(tt.shape.dim)]
        feeds[vi.name] = rng.standard_normal(dims).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(dims, dtype)

    def run(model: onnx.ModelProto) -> list:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return session.run(None, feeds)
        except Exception as exc:
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            return ReferenceEvaluator(model).run(None, feeds)

    try:
        expected = run(reference)
    except Exception as exc:
        return Verdict(False, f"the input model does not run ({' '.join(str(exc).split())[:200]}); use --no-verify")
    try:
        actual = run(candidate)
    except Exception as exc:
        return Verdict(False, f"the fused model does not run ({' '.join(str(exc).split())[:200]})")
    tolerance = {np.dtype(np.float16): 1e-2, np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}
    worst, ok = 0.0, True
    for e, a in zip(expected, actual):
        e, a = np.asarray(e), np.asarray(a)
        if e.shape != a.shape:
            return Verdict(False, f"output shapes differ: {e.shape} vs {a.shape}")
        if not np.issubdtype(e.dtype, np.floating):
            ok = ok and bool(np.array_equal(e, a))
            continue
        scale = float(np.max(np.abs(e.astype(np.float64)))) if e.size else 0.0
        err = float(np.max(np.abs(e.astype(np.float64) - a.astype(np.float64)))) if e.size else 0.0
        rel = err / scale if scale > 0 else err
        worst = max(worst, rel)
        ok = ok and rel <= tolerance.get(e.dtype, 1e-4)
    return Verdict(ok, f"max relative error {worst:.2e} on one random input")
