"""Time a candidate merge on ONNX Runtime: the layers as they stand against the merged conv.

The ``latency`` policy's timer (:class:`OrtTimer`, a :class:`~convfuse.timing.Timer`): the
front ends pass it in (:func:`judge_for`) so that the core (:mod:`convfuse.policy`,
:mod:`convfuse.planner`) imports no runtime. :func:`build_models` writes both sides of a
:class:`~convfuse.timing.Candidate` as tiny standalone ONNX models with the same input:

- a conv is a ``Conv`` node with explicit pads, written by the front end's own writer
  (:func:`convfuse.frontends.onnx.nodes.conv_node`), as both front ends write merged convs;
- a per-channel affine (BatchNorm, Mul/Add by a constant: a depthwise 1x1 conv at stride 1)
  is ``Mul`` then ``Add`` by ``[1, C, 1, ...]`` constants, what ONNX Runtime runs for an
  unfolded BatchNorm (it may fold them into a preceding Conv itself, as it would in the
  deployed model); a zero pad is a ``Pad`` node; an identity is nothing;
- average pooling is timed as the depthwise conv it equals.

The torch front end is timed on ONNX Runtime as well, from the same specs: a proxy for what
the layers cost, not a measurement of torch itself.

:class:`OrtTimer` times both models in sessions from :func:`convfuse.runtime.timing_session`
(every graph optimization on, a fixed number of intra-op threads), in interleaved repetitions,
and takes the median of each. The bookkeeping (cache, budget, notes) is
:class:`convfuse.timing.LatencyMeter`'s.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import runtime
from .decline import Decline
from .errors import DeviceUnavailableError
from .frontends.onnx.nodes import conv_node
from .policy import Judge, Policy
from .spec import ConvSpec, is_shape_only
from .timing import (
    DEFAULT_BUDGET,
    DEFAULT_MARGIN,
    LATENCY_DEVICES,
    Block,
    Candidate,
    LatencyMeter,
    Parallel,
    Timer,
    Timing,
    TimingError,
    advance,
    affine_parts,
    check_device,
    is_per_channel,
)

__all__ = [
    "DEFAULT_BUDGET",
    "DEFAULT_MARGIN",
    "LATENCY_DEVICES",
    "Candidate",
    "LatencyMeter",
    "OrtTimer",
    "Parallel",
    "TimingModels",
    "Timing",
    "build_models",
    "cuda_available",
    "judge_for",
]

_OPSET = 17
_IR_VERSION = 8
_ELEM = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
}


# --------------------------------------------------------------------------- ONNX models
class _Builder:
    """Writes one timing model: nodes and initializers, fresh names, weights as given or random."""

    def __init__(self, elem: int, seed: int = 0) -> None:
        self.elem = elem
        self.np_type = helper.tensor_dtype_to_np_dtype(elem)
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0

    def fresh(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def values(self, values: np.ndarray | None, shape: Sequence[int]) -> np.ndarray:
        """``values`` in ``shape`` when they are real, else seeded random ones (timing only)."""
        if values is None or is_shape_only(values):
            fan_in = max(1, math.prod(shape[1:]))
            return np.asarray(self.rng.standard_normal(tuple(shape)) / math.sqrt(fan_in))
        return np.asarray(values).reshape(tuple(shape))

    def const(self, values: np.ndarray | None, shape: Sequence[int], prefix: str) -> str:
        """An initializer of ``shape`` holding :meth:`values`."""
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(self.values(values, shape).astype(self.np_type), name))
        return name

    def node(self, op: str, inputs: Sequence[str], **attrs: Any) -> str:
        out = self.fresh(f"{op.lower()}_out")
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh(op), **attrs))
        return out

    def conv(self, x: str, spec: ConvSpec) -> str:
        """``spec`` as the front ends write a merged conv (shape-only weights made real first)."""
        weight = self.values(spec.weight, tuple(spec.weight.shape))
        bias = None if spec.bias is None else self.values(spec.bias, (spec.out_channels,))
        y = self.fresh("conv_out")
        written = conv_node(
            replace(spec, weight=weight, bias=bias),
            name=self.fresh("Conv"),
            x=x,
            y=y,
            elem_type=self.elem,
            fresh=self.fresh,
        )
        if isinstance(written, Decline):
            raise TimingError(f"no timing model for this conv: {written.message}")
        node, tensors = written
        self.nodes.append(node)
        self.inits.extend(numpy_helper.from_array(t.array, t.name) for t in tensors)
        return y

    def layer(self, x: str, spec: ConvSpec) -> str:
        if not is_per_channel(spec):
            return self.conv(x, spec)
        channel_shape = (1, spec.out_channels) + (1,) * spec.ndim
        if spec.is_padded:
            flat = [0, 0] + [b for b, _ in spec.pads] + [0, 0] + [e for _, e in spec.pads]
            pads = self.fresh("pads")
            self.inits.append(numpy_helper.from_array(np.asarray(flat, dtype=np.int64), pads))
            x = self.node("Pad", [x, pads])
        scale, shift = affine_parts(spec)
        if scale:
            x = self.node("Mul", [x, self.const(spec.weight, channel_shape, "scale")])
        if shift:
            x = self.node("Add", [x, self.const(spec.bias, channel_shape, "shift")])
        return x

    def block(self, x: str, block: Block) -> str:
        for item in block:
            if isinstance(item, Parallel):
                outs = [self.block(x, branch) for branch in item.branches]
                acc = outs[0]
                for other in outs[1:]:
                    acc = self.node("Add", [acc, other])
                x = acc
            else:
                x = self.layer(x, item)
        return x

    def model(self, x: str, y: str, in_shape: Sequence[int], out_shape: Sequence[int]) -> onnx.ModelProto:
        if y == x:  # an all-identity block: ONNX needs a node between input and output
            y = self.node("Identity", [x])
        graph = helper.make_graph(
            self.nodes,
            "timing",
            [helper.make_tensor_value_info(x, self.elem, list(in_shape))],
            [helper.make_tensor_value_info(y, self.elem, list(out_shape))],
            self.inits,
        )
        return helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=_IR_VERSION
        )


def _elem_type(candidate: Candidate) -> int:
    try:
        elem = _ELEM.get(np.dtype(candidate.dtype))
    except TypeError:  # a dtype numpy lacks (bfloat16)
        elem = None
    if elem is None:
        raise TimingError(f"no timing model for element type {candidate.dtype}")
    return elem


def _out_shape(candidate: Candidate) -> list[int]:
    return [int(d or 0) for d in advance(candidate.known_shape(), candidate.merged)]


class TimingModels(NamedTuple):
    """Both sides of a candidate as standalone models with the same input."""

    original: onnx.ModelProto
    merged: onnx.ModelProto


def build_models(candidate: Candidate, seed: int = 0) -> TimingModels:
    """The original layers and the merged conv as two standalone models with the same input.

    ``candidate.input_shape`` must be fully known (see :meth:`Candidate.resolved`;
    :class:`~convfuse.timing.TimingError` otherwise). Weights are the specs' own where they hold
    values (so both models compute the same function) and seeded random ones for shape-only specs.
    """
    in_shape = list(candidate.known_shape())
    elem = _elem_type(candidate)
    out_shape = _out_shape(candidate)
    original = _Builder(elem, seed)
    y = original.block("x", candidate.original)
    merged = _Builder(elem, seed)
    z = merged.conv("x", candidate.merged)
    return TimingModels(
        original.model("x", y, in_shape, out_shape), merged.model("x", z, in_shape, out_shape)
    )


# --------------------------------------------------------------------------- timing
def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider."""
    return runtime.cuda_in_ort()


class OrtTimer:
    """Times both models of a candidate on ONNX Runtime; a :class:`~convfuse.timing.Timer`.

    Same session options for both (:func:`convfuse.runtime.timing_session`), inputs and outputs
    bound once on the device, two warm-up runs each, then ``repeats`` interleaved samples (the
    order alternates), each sample averaging enough runs to last about ``sample_seconds``; the
    result is the median of each side. Sampling stops early (after at least three samples each)
    once ``max_seconds`` have passed.
    """

    def __init__(
        self,
        device: str = "cpu",
        *,
        threads: int = 1,
        repeats: int = 15,
        sample_seconds: float = 1e-3,
        max_seconds: float = 1.0,
    ) -> None:
        check_device(device)
        if device == "cuda" and not cuda_available():
            raise DeviceUnavailableError(
                "CUDA was requested for latency timing but this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu on a machine with a GPU, or use device 'cpu')"
            )
        self.device = device
        self.threads = threads
        self.repeats = repeats
        self.sample_seconds = sample_seconds
        self.max_seconds = max_seconds

    def describe(self) -> str:
        return (
            f"ONNX Runtime {self.device}, {self.threads} thread(s), "
            f"median of up to {self.repeats} interleaved samples"
        )

    def _runner(
        self, model: onnx.ModelProto, what: str, x: np.ndarray, out: Sequence[int]
    ) -> Callable[[], None]:
        try:
            sess = runtime.timing_session(model, self.device, self.threads, f"{what} timing model")
        except runtime.SessionError as exc:
            raise TimingError(exc.message) from None
        return runtime.bound_runner(sess, x, out, self.device)

    def __call__(self, candidate: Candidate) -> Timing:
        original, merged = build_models(candidate)
        shape = list(candidate.known_shape())
        out_shape = _out_shape(candidate)
        np_type = helper.tensor_dtype_to_np_dtype(_elem_type(candidate))
        x = np.random.default_rng(1).standard_normal(shape).astype(np_type)
        runs = [
            self._runner(original, "original", x, out_shape),
            self._runner(merged, "merged", x, out_shape),
        ]
        try:
            samples = _sample(runs, self.repeats, self.sample_seconds, self.max_seconds)
        except Exception as exc:  # a kernel ORT lacks shows up at run time for some types
            raise TimingError(
                f"onnxruntime failed to run a timing model: {runtime.ort_message(exc)}"
            ) from None
        return Timing(statistics.median(samples[0]), statistics.median(samples[1]))


def _sample(
    runs: Sequence[Callable[[], None]], repeats: int, sample_seconds: float, max_seconds: float
) -> list[list[float]]:
    """Seconds per run of each side: warm-up, then interleaved samples until ``max_seconds``."""
    for run in runs:
        run()
        run()
    once = []
    for run in runs:
        start = time.perf_counter()
        run()
        once.append(time.perf_counter() - start)
    inner = max(1, min(1000, math.ceil(sample_seconds / max(min(once), 1e-7))))
    samples: list[list[float]] = [[] for _ in runs]
    start = time.perf_counter()
    for r in range(repeats):
        order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
        for side in order:
            t0 = time.perf_counter()
            for _ in range(inner):
                runs[side]()
            samples[side].append((time.perf_counter() - t0) / inner)
        if r >= 2 and time.perf_counter() - start > max_seconds:
            break
    return samples


# --------------------------------------------------------------------------- for the front ends
def judge_for(
    policy: Policy | str,
    device: str = "cpu",
    budget: float = DEFAULT_BUDGET,
    timer: Timer | None = None,
    progress: Callable[[str], None] | None = None,
) -> Judge:
    """The judge a front end decides with: under ``latency`` a meter timing with ``timer``
    (default: an :class:`OrtTimer` on ``device``, which raises
    :class:`~convfuse.errors.DeviceUnavailableError` for CUDA on a machine without it)."""
    chosen = Policy.parse(policy)
    if chosen is not Policy.LATENCY:
        return Judge(chosen)
    check_device(device)
    meter = LatencyMeter(
        device, budget, timer=timer if timer is not None else OrtTimer(device), progress=progress
    )
    return Judge(chosen, meter)
