"""The ONNX front end's entry point: :func:`fuse_onnx` loads a model, applies the rewrite rules
(:mod:`.rewrite`) to every graph and reports the before/after statistics (:mod:`.stats`).
"""

from __future__ import annotations

import os
import time

import onnx

from ...decline import Reason
from ...errors import InvalidModelError, InvalidOptionError
from ...latency import judge_for
from ...policy import Policy
from ...report import Report
from ...timing import DEFAULT_BUDGET, Timer
from .index import Progress, _Names, _opset, _State
from .io import LoadedModel, check_model, load_model
from .nodes import label
from .prepass import prepare
from .rewrite import _fuse_graph
from .stats import _knows_conv_outputs, _summarise, infer_shapes, model_stats

__all__ = ["fuse_onnx"]


# --------------------------------------------------------------------------- public API
def fuse_onnx(
    model: onnx.ModelProto | LoadedModel | str | os.PathLike[str],
    policy: Policy | str = Policy.FLOPS,
    *,
    progress: Progress | None = None,
    device: str = "cpu",
    latency_budget: float = DEFAULT_BUDGET,
    timer: Timer | None = None,
    inplace: bool = False,
) -> tuple[onnx.ModelProto, Report]:
    """Merge every linear run of ``model`` into single convolutions; return a new model and a report.

    ``model`` is a ``ModelProto`` (left unchanged unless ``inplace``), a path (external data
    beside it is read), or what :func:`~convfuse.frontends.onnx.io.read_model` returned (already
    checked: the ONNX checker serialises every weight, so it runs once per model). ``policy``:
    ``"flops"`` merges only what does not increase MACs or parameters, ``"always"`` every exact
    merge, ``"latency"`` the merges ONNX Runtime measures faster on ``device`` (``"cpu"`` or
    ``"cuda"``), timing for at most ``latency_budget`` seconds in all (then the flops rule);
    ``timer`` replaces the ONNX Runtime timer
    (:mod:`convfuse.latency`). ``progress`` receives one-line status messages (for large models
    and timings). ``inplace=True`` fuses the given ModelProto itself and returns it, saving a
    copy of every weight (for models of gigabytes whose original is not needed).
    Raises :class:`~convfuse.errors.InvalidModelError` for input that is not a valid model (the
    message names the file), :class:`~convfuse.errors.InvalidOptionError` for an unknown policy
    and :class:`~convfuse.errors.DeviceUnavailableError` for ``device="cuda"`` without CUDA.
    """
    if isinstance(model, (str, os.PathLike)):
        source = load_model(model)
        inplace = True  # nobody else holds it
    elif isinstance(model, LoadedModel):
        source = model.model  # read_model checked it
    elif isinstance(model, onnx.ModelProto):
        check_model(model)
        source = model
    else:
        raise InvalidModelError(f"fuse_onnx needs an onnx.ModelProto or a path, got {type(model).__name__}")
    try:
        chosen = Policy.parse(policy)
    except ValueError as exc:
        raise InvalidOptionError(str(exc)) from None
    say: Progress = progress or (lambda message: None)
    judge = judge_for(chosen, device, latency_budget, timer, progress=say)  # the ORT timer under latency
    if inplace:
        fused = source
    else:
        fused = onnx.ModelProto()
        fused.CopyFrom(source)
    started = time.monotonic()
    say("inferring shapes")
    shapes, note = infer_shapes(fused)
    report = Report()
    report.before = model_stats(fused, shapes)
    report.positions = {label(node): i for i, node in enumerate(fused.graph.node)}
    if prepare(fused, report):  # fold constants, read bias-filled borders (onnx_prepass)
        shapes, note = infer_shapes(fused)
    state = _State(judge, shapes, _opset(fused), report, say, _Names(fused))
    _fuse_graph(fused.graph, {}, state, "main graph")
    say("computing statistics of the result")
    # Merged convs write the tensors they replace: the shapes inferred before fusing cover them,
    # so shape inference runs once per pass (again only if a Conv output is new to them).
    report.after = model_stats(
        fused, shapes if _knows_conv_outputs(fused, shapes) else infer_shapes(fused)[0]
    )
    report.timings["fuse"] = time.monotonic() - started
    _summarise(report)
    if note:
        report.notes.append(note)
    if state.subgraphs:
        report.notes.append(f"walked {state.subgraphs} subgraph(s) (If/Loop/Scan bodies)")
    inputs = {i.name for i in fused.graph.input}
    overridable = sum(1 for t in fused.graph.initializer if t.name in inputs)
    if overridable and any(d.reason is Reason.NON_CONSTANT for d in report.declines):
        report.notes.append(
            f"{overridable} initializer(s) are also graph inputs, so they may be overridden at run time and "
            "are not merged; export without them as inputs (torch: keep_initializers_as_inputs=False)"
        )
    if fused.functions:
        report.notes.append(f"{len(fused.functions)} model-local function(s) were not walked")
    if report.before.macs is not None:
        counted = "Conv and ConvTranspose" if report.before.op_counts.get("ConvTranspose") else "Conv"
        report.notes.append(f"MACs: multiply-accumulates of {counted} nodes per sample")
    report.notes.extend(judge.notes())
    return fused, report
