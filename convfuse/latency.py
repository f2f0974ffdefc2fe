"""Time a candidate merge on ONNX Runtime: the layers as they stand against the merged conv.

The ``latency`` policy (:class:`convfuse.policy.Judge`) of both front ends asks this module.
A :class:`Candidate` describes a merge framework-neutrally: the original layers as
:class:`~convfuse.spec.ConvSpec` values run one after another (a :class:`Parallel` for branches
that are summed), the merged conv, and the input shape. :func:`build_models` writes both sides
as tiny standalone ONNX models with the same input:

- a conv is a ``Conv`` node with explicit pads;
- a per-channel affine (BatchNorm, Mul/Add by a constant: a depthwise 1x1 conv at stride 1)
  is ``Mul`` then ``Add`` by ``[1, C, 1, ...]`` constants, what ONNX Runtime runs for an
  unfolded BatchNorm (it may fold them into a preceding Conv itself, as it would in the
  deployed model); a zero pad is a ``Pad`` node; an identity is nothing;
- average pooling is timed as the depthwise conv it equals;
- the merged side is one ``Conv`` node, as both front ends write it.

The torch front end is timed on ONNX Runtime as well, from the same specs: a proxy for what
the layers cost, not a measurement of torch itself.

:class:`OrtTimer` times both models with the same session options (every ONNX Runtime graph
optimization on, a fixed number of intra-op threads), in interleaved repetitions, and takes the
median of each. :class:`LatencyMeter` caches timings per geometry (identical blocks are timed
once), fills in unknown input dims (:data:`DEFAULT_BATCH`, :data:`DEFAULT_SPATIAL`), and stops
timing once its total budget is spent; the judge then falls back to the flops rule.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .errors import ConvfuseError, DeviceUnavailableError, one_line
from .spec import ConvSpec, is_shape_only

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_BUDGET",
    "DEFAULT_MARGIN",
    "DEFAULT_SPATIAL",
    "LATENCY_DEVICES",
    "Block",
    "Candidate",
    "LatencyMeter",
    "OrtTimer",
    "Parallel",
    "Shape",
    "Timer",
    "Timing",
    "TimingError",
    "advance",
    "build_models",
    "cuda_available",
    "ms",
]

#: Devices the latency policy can time on.
LATENCY_DEVICES = ("cpu", "cuda")
#: Seconds of timing per fuse pass; later candidates are judged by the flops rule.
DEFAULT_BUDGET = 30.0
#: A merge is kept when ``merged <= original * (1 + margin)``: within timing noise, removing
#: layers wins the tie.
DEFAULT_MARGIN = 0.05
#: Batch used when the model's batch dim is symbolic.
DEFAULT_BATCH = 1
#: Spatial size per dim used when the model's spatial dims are symbolic (about 3k positions).
DEFAULT_SPATIAL = {1: 3136, 2: 56, 3: 16}

_OPSET = 17
_IR_VERSION = 8
_ELEM = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.float64): TensorProto.DOUBLE,
}

Shape = tuple[int | None, ...]


@dataclass(frozen=True, eq=False)
class Parallel:
    """Branches that all read the same tensor, summed; an empty branch is the tensor itself."""

    branches: tuple[Block, ...]


Block = tuple[ConvSpec | Parallel, ...]


@dataclass(frozen=True, eq=False)
class Candidate:
    """A merge to time: ``original`` layers on an ``input_shape`` tensor against ``merged``.

    ``input_shape`` is ``[N, C, *spatial]``; ``None`` entries are unknown (symbolic) and get
    the defaults. ``merged`` may be a shape-only spec (:func:`convfuse.spec.shape_only`): timing
    needs shapes, not values. ``dtype`` is the model's element type (a numpy dtype, or the name of
    one numpy lacks, such as ``"bfloat16"``, which has no timing model).
    """

    original: Block
    merged: ConvSpec
    input_shape: Shape
    dtype: np.dtype | str = np.dtype(np.float32)

    def resolved(self) -> tuple[Candidate, tuple[bool, bool]]:
        """This candidate with unknown dims filled in, and whether the batch and whether a
        spatial dim took its default."""
        ndim = self.merged.ndim
        shape = tuple(self.input_shape)
        if len(shape) != ndim + 2:
            shape = (None, self.merged.in_channels) + (None,) * ndim
        batch = shape[0] if shape[0] else DEFAULT_BATCH
        spatial = tuple(d if d else DEFAULT_SPATIAL[ndim] for d in shape[2:])
        full = (batch, self.merged.in_channels, *spatial)
        return replace(self, input_shape=full), (not shape[0], any(not d for d in shape[2:]))

    def key(self) -> tuple[object, ...]:
        """What the timing depends on: shapes, geometry, the kind of each layer; not values."""
        return (tuple(self.input_shape), str(self.dtype), _block_key(self.original), _conv_key(self.merged))


class Timing(NamedTuple):
    """Median seconds per run of the original layers and of the merged conv."""

    original: float
    merged: float


#: Times a candidate whose input shape is fully known; raises :class:`TimingError` when it cannot.
Timer = Callable[[Candidate], Timing]


class TimingError(ConvfuseError):
    """ONNX Runtime could not build or run a timing model (an element type it has no kernel for)."""


# --------------------------------------------------------------------------- layer kinds
def _per_channel(spec: ConvSpec) -> bool:
    """A depthwise 1x1 conv at stride 1: a per-channel affine (with a zero pad around it)."""
    return (
        spec.is_pointwise
        and spec.groups == spec.in_channels == spec.out_channels
        and all(s == 1 for s in spec.stride)
    )


def _affine_parts(spec: ConvSpec) -> tuple[bool, bool]:
    """Whether a per-channel spec needs its ``Mul`` and its ``Add`` (a shape-only one needs both)."""
    if is_shape_only(spec.weight):
        return True, spec.bias is not None
    scale = not bool(np.all(spec.weight == 1))
    shift = spec.bias is not None and not is_shape_only(spec.bias) and spec.has_nonzero_bias()
    return scale, shift


def _layer_kind(spec: ConvSpec) -> str:
    if not _per_channel(spec):
        return "conv"
    scale, shift = _affine_parts(spec)
    return f"pad{int(spec.is_padded)}-mul{int(scale)}-add{int(shift)}"


def _conv_key(spec: ConvSpec) -> tuple[object, ...]:
    return (
        tuple(spec.weight.shape),
        spec.stride,
        spec.dilation,
        spec.groups,
        spec.pads,
        spec.bias is not None,
    )


def _block_key(block: Block) -> tuple[object, ...]:
    out: list[object] = []
    for item in block:
        if isinstance(item, Parallel):
            out.append(("sum", tuple(_block_key(b) for b in item.branches)))
        else:
            out.append((_layer_kind(item), _conv_key(item)))
    return tuple(out)


def advance(shape: Shape, spec: ConvSpec) -> Shape:
    """The shape after ``spec``: its output channels, and each known spatial dim it maps."""
    spatial = tuple(
        None if n is None else (n + b + e - x) // s + 1
        for n, (b, e), x, s in zip(shape[2:], spec.pads, spec.extent, spec.stride)
    )
    return (shape[0], spec.out_channels, *spatial)


def _advance_block(shape: Shape, block: Block) -> Shape:
    for item in block:
        if isinstance(item, Parallel):
            outs = [_advance_block(shape, b) for b in item.branches]
            shape = outs[0]
        else:
            shape = advance(shape, item)
    return shape


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

    def const(self, values: np.ndarray | None, shape: Sequence[int], prefix: str) -> str:
        """An initializer of ``shape``: ``values`` when they are real, else random (timing only)."""
        if values is None or is_shape_only(values):
            fan_in = max(1, math.prod(shape[1:]))
            array = self.rng.standard_normal(tuple(shape)) / math.sqrt(fan_in)
        else:
            array = values.reshape(tuple(shape))
        name = self.fresh(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(array).astype(self.np_type), name))
        return name

    def node(self, op: str, inputs: Sequence[str], **attrs: object) -> str:
        out = self.fresh(f"{op.lower()}_out")
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=self.fresh(op), **attrs))
        return out

    def conv(self, x: str, spec: ConvSpec) -> str:
        inputs = [x, self.const(spec.weight, tuple(spec.weight.shape), "w")]
        if spec.bias is not None:
            inputs.append(self.const(spec.bias, (spec.out_channels,), "b"))
        return self.node(
            "Conv",
            inputs,
            kernel_shape=list(spec.kernel_size),
            strides=list(spec.stride),
            dilations=list(spec.dilation),
            group=spec.groups,
            pads=[b for b, _ in spec.pads] + [e for _, e in spec.pads],
        )

    def layer(self, x: str, spec: ConvSpec) -> str:
        if not _per_channel(spec):
            return self.conv(x, spec)
        channel_shape = (1, spec.out_channels) + (1,) * spec.ndim
        if spec.is_padded:
            flat = [0, 0] + [b for b, _ in spec.pads] + [0, 0] + [e for _, e in spec.pads]
            pads = self.fresh("pads")
            self.inits.append(numpy_helper.from_array(np.asarray(flat, dtype=np.int64), pads))
            x = self.node("Pad", [x, pads])
        scale, shift = _affine_parts(spec)
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


def build_models(candidate: Candidate, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The original layers and the merged conv as two standalone models with the same input.

    ``candidate.input_shape`` must be fully known (see :meth:`Candidate.resolved`). Weights are
    the specs' own where they hold values (so both models compute the same function) and
    seeded random ones for shape-only specs.
    """
    shape = tuple(candidate.input_shape)
    if any(d is None for d in shape):
        raise ValueError(f"timing needs a known input shape, got {list(shape)}")
    try:
        elem = _ELEM.get(np.dtype(candidate.dtype))
    except TypeError:  # a dtype numpy lacks (bfloat16)
        elem = None
    if elem is None:
        raise TimingError(f"no timing model for element type {candidate.dtype}")
    in_shape = [int(d) for d in shape]  # type: ignore[arg-type]
    out_shape = [int(d) for d in advance(shape, candidate.merged)]  # type: ignore[arg-type]
    original = _Builder(elem, seed)
    y = original.block("x", candidate.original)
    merged = _Builder(elem, seed)
    z = merged.conv("x", candidate.merged)
    return original.model("x", y, in_shape, out_shape), merged.model("x", z, in_shape, out_shape)


# --------------------------------------------------------------------------- timing
def _ort():  # noqa: ANN202 - the onnxruntime module
    from .runtime import ort

    return ort()


def cuda_available() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider."""
    from .runtime import cuda_in_ort

    return cuda_in_ort()


class OrtTimer:
    """Times both models of a candidate on ONNX Runtime; a :data:`Timer`.

    Same session options for both (all graph optimizations, ``threads`` intra-op threads, one
    inter-op thread), inputs and outputs bound once on the device, two warm-up runs each, then
    ``repeats`` interleaved samples (the order alternates), each sample averaging enough runs
    to last about ``sample_seconds``; the result is the median of each side. Sampling stops
    early (after at least three samples each) once ``max_seconds`` have passed.
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
        if device not in LATENCY_DEVICES:
            raise ConvfuseError(f"latency device must be one of {', '.join(LATENCY_DEVICES)}, got {device!r}")
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

    def _session(self, model: onnx.ModelProto, what: str):  # noqa: ANN202 - an InferenceSession
        rt = _ort()
        options = rt.SessionOptions()
        options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        providers = ["CPUExecutionProvider"]
        if self.device == "cuda":
            providers.insert(0, "CUDAExecutionProvider")
        try:
            session = rt.InferenceSession(
                model.SerializeToString(), sess_options=options, providers=providers
            )
        except Exception as exc:  # ORT raises its own Fail/NotImplemented types
            raise TimingError(
                f"onnxruntime cannot load the {what} timing model: {one_line(exc, 160)}"
            ) from None
        if self.device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
            raise DeviceUnavailableError(
                "onnxruntime could not start its CUDA provider (no usable GPU or CUDA libraries)"
            )
        return session

    def _runner(self, session, x: np.ndarray, out_shape: Sequence[int]) -> Callable[[], None]:  # noqa: ANN001
        rt = _ort()
        binding = session.io_binding()
        value = rt.OrtValue.ortvalue_from_numpy(x, self.device, 0)
        binding.bind_ortvalue_input(session.get_inputs()[0].name, value)
        out = rt.OrtValue.ortvalue_from_shape_and_type(list(out_shape), x.dtype, self.device, 0)
        binding.bind_ortvalue_output(session.get_outputs()[0].name, out)

        def run() -> None:
            session.run_with_iobinding(binding)

        return run

    def __call__(self, candidate: Candidate) -> Timing:
        original, merged = build_models(candidate)
        shape = [int(d) for d in candidate.input_shape]  # type: ignore[arg-type]
        out_shape = [int(d) for d in advance(tuple(shape), candidate.merged)]  # type: ignore[arg-type]
        np_type = helper.tensor_dtype_to_np_dtype(_ELEM[candidate.dtype])
        x = np.random.default_rng(1).standard_normal(shape).astype(np_type)
        runs = [
            self._runner(self._session(original, "original"), x, out_shape),
            self._runner(self._session(merged, "merged"), x, out_shape),
        ]
        try:
            for run in runs:
                run()
                run()
            once = []
            for run in runs:
                start = time.perf_counter()
                run()
                once.append(time.perf_counter() - start)
            inner = max(1, min(1000, math.ceil(self.sample_seconds / max(min(once), 1e-7))))
            samples: list[list[float]] = [[], []]
            start = time.perf_counter()
            for r in range(self.repeats):
                order = (0, 1) if r % 2 == 0 else (1, 0)
                for side in order:
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        runs[side]()
                    samples[side].append((time.perf_counter() - t0) / inner)
                if r >= 2 and time.perf_counter() - start > self.max_seconds:
                    break
        except Exception as exc:  # a kernel ORT lacks shows up at run time for some types
            raise TimingError(f"onnxruntime failed to run a timing model: {one_line(exc, 160)}") from None
        return Timing(statistics.median(samples[0]), statistics.median(samples[1]))


# --------------------------------------------------------------------------- the meter
def ms(seconds: float) -> str:
    """Seconds as milliseconds with three significant digits."""
    return f"{seconds * 1e3:.3g} ms"


class LatencyMeter:
    """Timings of candidates: cached per geometry, within a total budget, with their notes.

    ``timer`` defaults to an :class:`OrtTimer` on ``device`` (which raises
    :class:`~convfuse.errors.DeviceUnavailableError` for CUDA on a machine without it); tests
    inject a fake one, and ``clock`` measures what the budget counts. ``margin`` is the
    tolerance of the decision (:func:`convfuse.policy.judge_latency`).
    """

    def __init__(
        self,
        device: str = "cpu",
        budget: float = DEFAULT_BUDGET,
        margin: float = DEFAULT_MARGIN,
        timer: Timer | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if device not in LATENCY_DEVICES:
            raise ConvfuseError(f"latency device must be one of {', '.join(LATENCY_DEVICES)}, got {device!r}")
        if budget < 0 or margin < 0:
            raise ConvfuseError(f"latency budget and margin must be >= 0, got {budget} and {margin}")
        self.device = device
        self.budget = budget
        self.margin = margin
        self.timer: Timer = timer if timer is not None else OrtTimer(device)
        self.clock = clock
        self.progress = progress or (lambda message: None)
        self.spent = 0.0
        self.timed = 0  # candidates timed
        self.reused = 0  # answers from the cache
        self.default_batch = 0  # timed on the default batch
        self.default_spatial = 0  # timed on default spatial dims
        self.over_budget = 0  # asked after the budget was spent
        self.failures: list[str] = []
        self._cache: dict[tuple[object, ...], Timing | str] = {}

    def measure(self, candidate: Candidate) -> Timing | str:
        """The candidate's timing, or a phrase saying why it was not timed."""
        full, defaulted = candidate.resolved()
        key = full.key()
        found = self._cache.get(key)
        if found is not None:
            self.reused += 1
            return found
        if self.spent >= self.budget:
            self.over_budget += 1
            return f"latency budget of {self.budget:g} s spent"
        start = self.clock()
        try:
            result: Timing | str = self.timer(full)
        except TimingError as exc:
            result = f"not timed ({exc})"
            self.failures.append(str(exc))
        self.spent += self.clock() - start
        self._cache[key] = result
        if isinstance(result, Timing):
            self.timed += 1
            self.default_batch += int(defaulted[0])
            self.default_spatial += int(defaulted[1])
            self.progress(
                f"latency: timed candidate {self.timed} on {list(full.input_shape)}: "
                f"{ms(result.original)} -> {ms(result.merged)} ({self.spent:.1f} of {self.budget:g} s)"
            )
        return result

    def notes(self) -> list[str]:
        """What the report should say about the timings (nothing when no candidate was judged)."""
        if not (self.timed or self.reused or self.over_budget or self.failures):
            return []
        how = self.timer.describe() if isinstance(self.timer, OrtTimer) else "an injected timer"
        out = [
            f"latency: timed {self.timed} candidate merge(s) with {how} in {self.spent:.1f} s "
            f"({self.reused} answer(s) reused for identical geometry); a merge is kept when it measures "
            f"at most {self.margin:.0%} slower than its layers"
        ]
        if self.default_batch:
            out.append(
                f"latency: {self.default_batch} candidate(s) timed at batch {DEFAULT_BATCH}: the batch size is "
                "unknown (a symbolic dim, or no example inputs)"
            )
        if self.default_spatial:
            spatial = ", ".join(f"{s} in {n}D" for n, s in DEFAULT_SPATIAL.items())
            out.append(
                f"latency: {self.default_spatial} candidate(s) timed on a default spatial size per dim ({spatial}): "
                "the input size is unknown (symbolic dims, or no example inputs)"
            )
        if self.over_budget:
            out.append(
                f"latency: budget of {self.budget:g} s spent; {self.over_budget} later candidate(s) judged by the "
                "flops rule instead (raise the budget to time them)"
            )
        if self.failures:
            out.append(
                f"latency: {len(self.failures)} candidate(s) could not be timed and were judged by the flops rule "
                f"(first: {self.failures[0]})"
            )
        return out
