"""ONNX Runtime for convfuse: the one place sessions are made and run, for the verifier and the timer.

Two kinds of session, both here: :func:`session` runs a graph *as written* (graph optimizations
off, so the reference computes exactly what its graph says; ONNX's reference evaluator where ONNX
Runtime has no CPU kernel), for :mod:`convfuse.verify`; :func:`timing_session` runs it as
deployed (every optimization on, fixed threads), for :class:`convfuse.latency.OrtTimer`.
:func:`run` feeds a session and reads its outputs (bfloat16 included); :func:`bound_runner`
binds one input and output on the device for repeated timed runs.

Plumbing only: no judgement, no model files (those are :mod:`convfuse.verify`'s). Every
failure is a :class:`~convfuse.errors.ConvfuseError` with a one-line message naming the model
concerned (``what``); ONNX Runtime is imported on first use so that ``import convfuse`` stays light.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ConvfuseError, DeviceUnavailableError, InvalidModelError, one_line

__all__ = [
    "ReferenceSession",
    "Session",
    "SessionError",
    "bfloat16_bits",
    "bfloat16_values",
    "bound_runner",
    "cuda_in_ort",
    "ort",
    "ort_message",
    "run",
    "session",
    "timing_session",
]

#: What :func:`session` returns: an ``onnxruntime.InferenceSession`` or a :class:`ReferenceSession`.
Session = Any


def ort() -> Any:
    """onnxruntime, imported on first use so that ``import convfuse`` stays light."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def cuda_in_ort() -> bool:
    """Whether this onnxruntime build offers the CUDA execution provider."""
    return "CUDAExecutionProvider" in ort().get_available_providers()


def ort_message(error: BaseException) -> str:
    """ONNX Runtime's message on one line, without its status prefix and C++ source location."""
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", one_line(error))
    text = re.sub(r"\S*onnxruntime_src\S*\s+(?:\S+\(.*?\)\s+)?", "", text)
    return text.strip() or one_line(error)


def _providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def _check_cuda(sess: Any, device: str, what: str) -> None:
    if device == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise DeviceUnavailableError(
            f"onnxruntime could not start its CUDA provider for the {what} (no usable GPU or CUDA libraries)"
        )


# =========================================================================== bfloat16
def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Values rounded to bfloat16 (nearest even), as uint16 bit patterns (numpy has no bfloat16)."""
    bits = np.array(values, dtype=np.float32, order="C").view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)


def bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns as float32 values (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


# =========================================================================== the verifier's sessions
class ReferenceSession:
    """ONNX's reference evaluator standing in for ONNX Runtime on CPU where ONNX Runtime has no
    kernel (its CPU Conv has none for float64): slow, but it runs the graph as written."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self.evaluator = ReferenceEvaluator(model)

    def run(self, names: Sequence[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return list(self.evaluator.run(list(names), dict(feed)))


def session(model: onnx.ModelProto, device: str, what: str, path: str | None = None) -> Session:
    """An ONNX Runtime session on ``device`` with graph optimizations off: the graph as written.

    Both models get the same settings. With optimizations off ORT does not fold Conv+BN or
    reorder arithmetic itself, so the reference computes exactly what its graph says. On CPU, a
    model ONNX Runtime has no kernels for runs on :class:`ReferenceSession` instead. ``path``
    (a model over 2 GiB): ORT loads the file and its external data.
    """
    rt = ort()
    options = rt.SessionOptions()
    options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4  # fatal only: failures come back as exceptions, to become one line
    try:
        source = path if path is not None else model.SerializeToString()
        sess = rt.InferenceSession(source, sess_options=options, providers=_providers(device))
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        if device == "cpu" and "NOT_IMPLEMENTED" in str(e) and path is None:
            return ReferenceSession(model)
        raise InvalidModelError(f"onnxruntime cannot load the {what}: {ort_message(e)}") from None
    _check_cuda(sess, device, what)
    return sess


def run(
    sess: Session,
    feed: Mapping[str, np.ndarray],
    names: Sequence[str],
    what: str,
    *,
    bfloat16: Collection[str] = (),
) -> dict[str, np.ndarray]:
    """Outputs ``names`` of ``sess`` on ``feed``; bfloat16 comes back as float32 values.

    ``bfloat16`` names the inputs declared bfloat16 (numpy holds them as uint16 bits)."""
    if isinstance(sess, ReferenceSession):
        try:
            return dict(zip(names, sess.run(names, feed)))
        except Exception as e:  # the evaluator raises whatever its op implementations raise
            raise InvalidModelError(
                f"the ONNX reference evaluator failed to run the {what}: {one_line(e)}"
            ) from None
    rt = ort()
    values = {}
    for name, array in feed.items():
        array = np.require(array, requirements="C")  # keeps rank 0, unlike ascontiguousarray
        if name in bfloat16:
            values[name] = rt.OrtValue.ortvalue_from_numpy_with_onnx_type(array, TensorProto.BFLOAT16)
        else:
            values[name] = rt.OrtValue.ortvalue_from_numpy(array)
    try:
        results = sess.run_with_ort_values(list(names), values)
    except Exception as e:
        raise InvalidModelError(f"onnxruntime failed to run the {what}: {ort_message(e)}") from None
    outputs = {}
    for name, value in zip(names, results):
        if not value.is_tensor():
            raise InvalidModelError(f"output '{name}' of the {what} is not a tensor; only tensors compare")
        if value.data_type() == "tensor(bfloat16)":  # numpy cannot hold it: copy the bits out
            if value.device_name().lower() != "cpu":
                raise InvalidModelError(f"bfloat16 output '{name}' of the {what} is not in CPU memory")
            raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
            outputs[name] = bfloat16_values(np.frombuffer(raw, dtype=np.uint16).reshape(value.shape()))
        else:
            outputs[name] = value.numpy()
    return outputs


# =========================================================================== the timer's sessions
class SessionError(ConvfuseError):
    """ONNX Runtime could not load or run a model made for timing (the timer's TimingError wraps it)."""


def timing_session(model: onnx.ModelProto, device: str, threads: int, what: str) -> Session:
    """A session as deployed: every graph optimization on, ``threads`` intra-op threads, one
    inter-op thread, sequential execution. :class:`SessionError` when ORT cannot load ``model``."""
    rt = ort()
    options = rt.SessionOptions()
    options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = rt.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        sess = rt.InferenceSession(
            model.SerializeToString(), sess_options=options, providers=_providers(device)
        )
    except Exception as exc:  # ORT raises its own Fail/NotImplemented types
        raise SessionError(f"onnxruntime cannot load the {what}: {one_line(exc, 160)}") from None
    _check_cuda(sess, device, what)
    return sess


def bound_runner(sess: Session, x: np.ndarray, out_shape: Sequence[int], device: str) -> Callable[[], None]:
    """A call that runs ``sess`` once on ``x``, with its input and output bound on ``device``
    once (no copies between runs): what a timing loop calls."""
    rt = ort()
    binding = sess.io_binding()
    value = rt.OrtValue.ortvalue_from_numpy(x, device, 0)
    binding.bind_ortvalue_input(sess.get_inputs()[0].name, value)
    out = rt.OrtValue.ortvalue_from_shape_and_type(list(out_shape), x.dtype, device, 0)
    binding.bind_ortvalue_output(sess.get_outputs()[0].name, out)

    def run_once() -> None:
        sess.run_with_iobinding(binding)

    return run_once
