"""What the verifier runs on: the models (read as ``convfuse merge`` reads them), their declared
inputs and outputs (:class:`Port`), and the input sets (given, or generated from a seed).

Every failure is a :class:`~convfuse.errors.ConvfuseError` with a one-line message naming the
file or input concerned.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto

from ..compare import DEFAULT_RTOL
from ..errors import ConvfuseError, DeviceUnavailableError, InvalidModelError, one_line
from ..frontends.onnx.io import MAX_PROTOBUF, is_large, read_model
from ..runtime import bfloat16_bits

__all__ = [
    "DEVICES",
    "INT_INPUT_HIGH",
    "ONNX_DTYPES",
    "Devices",
    "Dims",
    "Feeds",
    "InputSpec",
    "OnnxSource",
    "Port",
    "RunnableModel",
    "Signature",
    "check_same_names",
    "checked_dims",
    "dims_text",
    "fits",
    "generate_inputs",
    "given_feeds",
    "load_for_run",
    "load_inputs",
    "load_model",
    "model_label",
    "parse_shape",
    "resolve_devices",
    "signature",
]

#: An ONNX model as the verifier takes it: the ModelProto, or the path of its file.
OnnxSource = onnx.ModelProto | str | os.PathLike[str]
#: Caller-given inputs: one mapping of arrays by input name, or one mapping per sample.
Feeds = Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]]

#: Accepted values of ``device``: one device, or ``all`` = cpu plus cuda when present.
DEVICES = ("cpu", "cuda", "all")

#: Generated integer inputs lie in ``[0, INT_INPUT_HIGH)``, valid as small indices too.
INT_INPUT_HIGH = 4

#: ONNX element type -> (dtype name, numpy dtype that holds it); bfloat16 is held as uint16 bits.
ONNX_DTYPES: dict[int, tuple[str, type[np.generic]]] = {
    TensorProto.FLOAT: ("float32", np.float32),
    TensorProto.DOUBLE: ("float64", np.float64),
    TensorProto.FLOAT16: ("float16", np.float16),
    TensorProto.BFLOAT16: ("bfloat16", np.uint16),
    TensorProto.INT8: ("int8", np.int8),
    TensorProto.INT16: ("int16", np.int16),
    TensorProto.INT32: ("int32", np.int32),
    TensorProto.INT64: ("int64", np.int64),
    TensorProto.UINT8: ("uint8", np.uint8),
    TensorProto.UINT16: ("uint16", np.uint16),
    TensorProto.UINT32: ("uint32", np.uint32),
    TensorProto.UINT64: ("uint64", np.uint64),
    TensorProto.BOOL: ("bool", np.bool_),
}

Dims = tuple[int | str | None, ...]


class InputSpec(NamedTuple):
    """One model input as run: name, dtype name, concrete shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Port:
    """A graph input or output as declared: element type and dims (int, symbol name or None)."""

    name: str
    elem_type: int
    dims: Dims | None  # None when the rank is not declared

    @property
    def dtype(self) -> str:
        known = ONNX_DTYPES.get(self.elem_type)
        return known[0] if known else f"onnx-type-{self.elem_type}"

    @classmethod
    def of(cls, value_info: onnx.ValueInfoProto) -> Port:
        t = value_info.type
        if not t.HasField("tensor_type"):
            return cls(value_info.name, -1, None)
        tt = t.tensor_type
        if not tt.HasField("shape"):
            return cls(value_info.name, tt.elem_type, None)
        dims = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim
        )
        return cls(value_info.name, tt.elem_type, dims)


def dims_text(shape: Sequence[int | str | None]) -> str:
    """``1x3x?x?`` (``scalar`` for rank 0)."""
    return "x".join("?" if d is None else str(d) for d in shape) if len(shape) else "scalar"


# =========================================================================== files and options
def load_model(source: str | os.PathLike[str] | onnx.ModelProto, what: str = "model") -> onnx.ModelProto:
    """An ONNX model from a path (read and checked like ``convfuse merge`` reads it, external
    data included) or the ModelProto itself; :class:`InvalidModelError` saying why not."""
    if isinstance(source, onnx.ModelProto):
        model = source
        if not model.HasField("graph") or not model.graph.output:
            raise InvalidModelError(f"{what} is not an ONNX model (no graph or no outputs)")
        return model
    path = os.fspath(source)
    try:
        return read_model(path).model
    except InvalidModelError as e:
        raise InvalidModelError(f"{what} '{path}': {e.message}") from None


class RunnableModel(NamedTuple):
    """A model to run: the ModelProto, and the file ONNX Runtime loads it from (``None``: from
    memory; set for files over 2 GiB, whose ``model`` then holds no tensor data)."""

    model: onnx.ModelProto
    path: str | None


def load_for_run(source: str | os.PathLike[str] | onnx.ModelProto, what: str = "model") -> RunnableModel:
    """:func:`load_model`, except that a file over 2 GiB (external data) is checked but its data is
    not read: its model comes back without tensor data, with the path ONNX Runtime loads it from
    (``None`` for every other model)."""
    if isinstance(source, onnx.ModelProto):
        if is_large(source):
            raise InvalidModelError(
                f"{what} is over 2 GiB: pass the file path (ONNX Runtime loads its external data itself)"
            )
        return RunnableModel(load_model(source, what), None)
    path = os.fspath(source)
    try:
        header = read_model(path, load_external_data=False)
    except InvalidModelError as e:
        raise InvalidModelError(f"{what} '{path}': {e.message}") from None
    if header.total_bytes <= MAX_PROTOBUF - (64 << 20):
        return RunnableModel(load_model(path, what), None)
    return RunnableModel(header.model, path)


def model_label(source: str | os.PathLike[str] | onnx.ModelProto) -> str:
    """How a model is named in results: its path, or its graph name."""
    if isinstance(source, onnx.ModelProto):
        return f"<ModelProto {source.graph.name!r}>" if source.graph.name else "<ModelProto>"
    return os.fspath(source)


def load_inputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file (``np.savez(path, input_name=array, ...)``) by name: one sample."""
    label = f"inputs file '{os.fspath(path)}'"
    if not os.path.isfile(path):
        raise ConvfuseError(f"{label} {'is a directory' if os.path.isdir(path) else 'does not exist'}")
    if not zipfile.is_zipfile(path):
        raise ConvfuseError(f"{label} is not an .npz archive (write one with np.savez(path, name=array))")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except Exception as e:  # numpy raises ValueError, OSError, BadZipFile... for a damaged archive
        raise ConvfuseError(f"{label} is not an .npz of arrays: {one_line(e)}") from None


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input=1x3x224x224"`` -> ``("input", (1, 3, 224, 224))``; ``,`` also separates dims."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise ConvfuseError(f"--shape {text!r} is not NAME=DIMS (e.g. input=1x3x224x224)")
    parts = [p for p in dims.replace(",", "x").split("x") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ConvfuseError(f"--shape {text!r}: dims must be integers separated by 'x'") from None
    if any(d < 1 for d in shape):
        raise ConvfuseError(f"--shape {text!r}: dims must be >= 1")
    return name, shape


class Devices(NamedTuple):
    """Devices to run on, and notes about the ones left out."""

    devices: list[str]
    notes: list[str]


def resolve_devices(device: str, cuda_available: Callable[[], bool], absent: str) -> Devices:
    """Devices to run on, and notes. CUDA asked for but absent raises; ``all`` notes its absence."""
    if device not in DEVICES:
        raise ConvfuseError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return Devices(["cpu"], [])
    if cuda_available():
        return Devices(["cpu", "cuda"] if device == "all" else ["cuda"], [])
    if device == "cuda":
        raise DeviceUnavailableError(f"CUDA was requested but {absent}; use device 'cpu' or 'all'")
    return Devices(["cpu"], [f"cuda not checked: {absent}"])


# =========================================================================== model signatures
class Signature(NamedTuple):
    """A model's ports as declared: the inputs a caller must feed, and the outputs."""

    inputs: list[Port]
    outputs: list[Port]


def signature(model: onnx.ModelProto) -> Signature:
    """Inputs a caller must feed (initializers excluded) and outputs, as declared."""
    initialized = {t.name for t in model.graph.initializer}
    inputs = [Port.of(v) for v in model.graph.input if v.name not in initialized]
    return Signature(inputs, [Port.of(v) for v in model.graph.output])


def check_same_names(kind: str, reference: Sequence[Port], candidate: Sequence[Port]) -> None:
    """Raise unless both models declare the same ``kind`` (input/output) names."""
    ref, cand = {p.name for p in reference}, {p.name for p in candidate}
    if ref != cand:
        only_ref, only_cand = ", ".join(sorted(ref - cand)) or "-", ", ".join(sorted(cand - ref)) or "-"
        raise InvalidModelError(
            f"reference and candidate must have the same {kind} names: only in reference: {only_ref}; "
            f"only in candidate: {only_cand}"
        )


def _merged_dims(ref: Port, cand: Port) -> Dims | None:
    """Declared dims of an input in both models: a fixed dim in either wins; fixed dims must agree."""
    if ref.dims is None or cand.dims is None:
        return ref.dims if cand.dims is None else cand.dims
    if len(ref.dims) != len(cand.dims) or any(
        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(ref.dims, cand.dims)
    ):
        raise InvalidModelError(
            f"input '{ref.name}' is {dims_text(ref.dims)} in the reference but {dims_text(cand.dims)} "
            "in the candidate"
        )
    return tuple(a if isinstance(a, int) else b for a, b in zip(ref.dims, cand.dims))


def fits(shape: Sequence[int], declared: Dims | None) -> bool:
    return declared is None or (
        len(shape) == len(declared) and all(not isinstance(d, int) or d == s for d, s in zip(declared, shape))
    )


def checked_dims(ref: Port, cand: Port) -> Dims | None:
    """The input's merged dims, after checking both models declare one feedable type for it."""
    if ref.elem_type != cand.elem_type:
        raise InvalidModelError(
            f"input '{ref.name}' is {ref.dtype} in the reference but {cand.dtype} in the candidate"
        )
    if ref.elem_type not in ONNX_DTYPES:
        raise InvalidModelError(f"input '{ref.name}' has type {ref.dtype}, which the verifier cannot feed")
    return _merged_dims(ref, cand)


def given_feeds(
    inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Port],
    candidate: Sequence[Port],
) -> list[dict[str, np.ndarray]]:
    """Caller-supplied input sets (one mapping per sample), checked against names, dtypes, dims."""
    sets = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not sets:
        raise ConvfuseError("no input sets given")
    cand_by_name = {p.name: p for p in candidate}
    names = [p.name for p in reference]
    feeds = []
    for given in sets:
        missing, extra = [n for n in names if n not in given], sorted(set(given) - set(names))
        if missing or extra:
            raise ConvfuseError(
                f"inputs must name exactly the model inputs ({', '.join(names)}): "
                f"missing {', '.join(missing) or '-'}; not inputs {', '.join(extra) or '-'}"
            )
        feed = {}
        for port in reference:
            declared = checked_dims(port, cand_by_name[port.name])
            array = np.asarray(given[port.name])
            if port.dtype == "bfloat16" and array.dtype.kind == "f":
                array = bfloat16_bits(array)  # floats given for a bfloat16 input: round them
            expected = np.dtype(ONNX_DTYPES[port.elem_type][1])
            if array.dtype != expected:
                raise ConvfuseError(
                    f"input '{port.name}' is declared {port.dtype} but the array given is {array.dtype}"
                )
            if not fits(array.shape, declared):
                raise ConvfuseError(
                    f"input '{port.name}' has shape {dims_text(array.shape)}, which does not fit its "
                    f"declared shape {dims_text(declared or ())}"
                )
            feed[port.name] = array
        feeds.append(feed)
    return feeds


# =========================================================================== generated inputs
def _random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal floats, integers in ``[0, INT_INPUT_HIGH)``, fair bools, held per ``ONNX_DTYPES``."""
    if dtype in DEFAULT_RTOL:
        values = np.asarray(rng.standard_normal(shape))
        return bfloat16_bits(values) if dtype == "bfloat16" else values.astype(dtype)
    if dtype == "bool":
        return np.asarray(rng.random(shape) < 0.5)
    return np.asarray(rng.integers(0, INT_INPUT_HIGH, size=shape)).astype(dtype)


def generate_inputs(specs: Sequence[InputSpec], samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``samples`` input sets; sample ``k`` depends only on ``(seed, k)`` and ``specs``."""
    feeds = []
    for k in range(samples):
        rng = np.random.default_rng([seed, k])
        feeds.append({s.name: _random_array(rng, s.dtype, s.shape) for s in specs})
    return feeds
