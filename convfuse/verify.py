"""Prove that a fused model computes what its reference computes, on CPU and (when present) CUDA.

Both models run on the same inputs (generated from the declared input types and shapes,
deterministic from a seed, or supplied by the caller) with the same runtime settings, and every
output is compared against a tolerance relative to that output's scale:

    passed  <=>  max |candidate - reference| <= rtol * max |reference| + atol

``rtol`` defaults per dtype (:data:`DEFAULT_RTOL`), ``atol`` to 0; integer and bool outputs
must match exactly. When an ONNX candidate fails, :func:`attribute` names the region that went
wrong by comparing every tensor both graphs share by name, and a failing image-shaped output is
classified as a ``border`` error (the signature of a padding mistake), ``interior`` or
``everywhere``.

The comparison math (:func:`compare`, :func:`locate`) is plain numpy; running models (ONNX
Runtime, torch) is plumbing around it. :class:`VerifyResult` is the typed answer the CLI prints.
"""

from __future__ import annotations

import copy
import ctypes
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto

from .errors import ConvfuseError, DeviceUnavailableError, InvalidModelError

__all__ = [
    "DEFAULT_RTOL",
    "DEVICES",
    "Comparison",
    "OutputCheck",
    "Suspect",
    "VerifyResult",
    "attribute",
    "compare",
    "load_inputs",
    "load_model",
    "locate",
    "parse_shape",
    "tolerance_for",
    "verify",
    "verify_modules",
    "verify_onnx",
]

#: Default relative tolerance per output dtype, as a fraction of the output's max |reference|.
#: Measured (16 RepVGG-style blocks merged in float64, cast back, run against the unmerged blocks):
#: float32 1.4e-6, float16 2.6e-3, bfloat16 1.3e-2, float64 2e-15; each default sits well above
#: that and below what a real fusion bug produces (DESIGN.md: fp32 ~1e-6 typical, 1e-4 is a bug).
DEFAULT_RTOL: dict[str, float] = {
    "float64": 1e-9,
    "float32": 1e-5,
    "float16": 1e-2,
    "bfloat16": 5e-2,
}

#: Accepted values of ``device``: one device, or ``all`` = cpu plus cuda when present.
DEVICES = ("cpu", "cuda", "all")

#: Integers generated for integer inputs lie in ``[0, _INT_HIGH)``: valid as small indices too.
_INT_HIGH = 4

# ONNX element type -> (name, numpy dtype used to hold it). bfloat16 is held as its uint16 bits.
_ONNX_DTYPES: dict[int, tuple[str, type]] = {
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

_TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "float64",
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int8: "int8",
    torch.int16: "int16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.bool: "bool",
}


# =========================================================================== comparison math
def tolerance_for(dtype: str, rtol: float | None = None, atol: float | None = None) -> tuple[float, float, bool]:
    """``(rtol, atol, exact)`` for an output of ``dtype``: caller's values over the defaults.

    Integer and bool outputs are compared exactly whatever the caller asks: a tolerance on an
    index or a mask has no meaning.
    """
    if dtype not in DEFAULT_RTOL:
        return 0.0, 0.0, True
    return (DEFAULT_RTOL[dtype] if rtol is None else float(rtol)), (0.0 if atol is None else float(atol)), False


@dataclass(frozen=True)
class Comparison:
    """How far ``candidate`` is from ``reference`` for one tensor (all samples together)."""

    max_abs_error: float
    scale: float  # max |reference| over finite values
    tolerance: float  # rtol * scale + atol (0 when exact)
    mismatched: int  # elements beyond the tolerance
    total: int
    location: str | None = None  # "border", "interior", "everywhere" for failing image-shaped tensors
    border_width: int | None = None  # ring width when location == "border"
    interior_max_abs_error: float | None = None  # inside the ring when location == "border"

    @property
    def max_rel_error(self) -> float:
        """Max abs error over the output's scale (max abs error itself when the scale is 0)."""
        return self.max_abs_error / self.scale if self.scale > 0 else self.max_abs_error

    @property
    def passed(self) -> bool:
        return self.mismatched == 0


def compare(
    reference: np.ndarray,
    candidate: np.ndarray,
    *,
    rtol: float,
    atol: float,
    exact: bool = False,
    spatial_from: int | None = None,
) -> Comparison:
    """Compare two same-shaped arrays against ``rtol * max|reference| + atol``.

    Non-finite values must agree position by position (NaN with NaN, +inf with +inf); a
    disagreement counts as an infinite error. ``spatial_from`` is the first spatial axis of an
    image-shaped tensor (e.g. 3 for ``[samples, N, C, H, W]``); a failing one gets a location.
    """
    if exact:
        bad = reference != candidate
        diff = np.abs(reference.astype(np.float64) - candidate.astype(np.float64))
        max_abs = float(diff.max()) if diff.size else 0.0
        magnitude = np.abs(reference.astype(np.float64))
        scale = float(magnitude.max()) if magnitude.size else 0.0
        tol = 0.0
    else:
        ref = reference.astype(np.float64, copy=False)
        cand = candidate.astype(np.float64, copy=False)
        ref_finite = np.isfinite(ref)
        both_finite = ref_finite & np.isfinite(cand)
        # Non-finite positions agree only when both hold the same special value.
        same_special = ~both_finite & ((ref == cand) | (np.isnan(ref) & np.isnan(cand)))
        diff = np.abs(np.subtract(ref, cand, out=np.zeros(ref.shape), where=both_finite))
        scale = float(np.abs(ref[ref_finite]).max()) if ref_finite.any() else 0.0
        tol = rtol * scale + atol
        bad = (diff > tol) | (~both_finite & ~same_special)
        max_abs = float(diff.max()) if diff.size else 0.0
        if (~both_finite & ~same_special).any():
            max_abs = math.inf
    mismatched = int(np.count_nonzero(bad))
    location = width = interior = None
    if mismatched and spatial_from is not None:
        location, width = locate(bad, spatial_from)
        if location == "border" and width is not None:
            interior = float(_interior(diff, spatial_from, width).max())
    return Comparison(max_abs, scale, tol, mismatched, int(bad.size), location, width, interior)


def _edge_distance(spatial: Sequence[int]) -> np.ndarray:
    """Distance of each position to the nearest edge of a ``spatial``-shaped grid."""
    grids = np.meshgrid(*[np.minimum(np.arange(n), n - 1 - np.arange(n)) for n in spatial], indexing="ij")
    return np.minimum.reduce(grids) if len(grids) > 1 else grids[0]


def _interior(values: np.ndarray, spatial_from: int, width: int) -> np.ndarray:
    """``values`` without a ring of ``width`` on every spatial axis."""
    index = tuple(slice(None) for _ in range(spatial_from)) + tuple(
        slice(width, n - width) for n in values.shape[spatial_from:]
    )
    return values[index]


def locate(bad: np.ndarray, spatial_from: int) -> tuple[str | None, int | None]:
    """Where the failing elements ``bad`` sit on the spatial grid (axes ``spatial_from`` on).

    ``border``: all failures within a ring of width ``w <= max(1, min(min(spatial) // 4, 8))``
    around the edge, and some interior left inside it (a padding mistake: right in the middle,
    wrong at the edge). ``interior``: the outermost ring is clean. ``everywhere`` otherwise.
    ``(None, None)`` when the grid is too small to tell (any spatial size below 3).
    """
    spatial = bad.shape[spatial_from:]
    if not spatial or min(spatial) < 3:
        return None, None
    failing = bad.reshape(-1, *spatial).any(axis=0)
    distance = _edge_distance(spatial)[failing]
    deepest, shallowest = int(distance.max()), int(distance.min())
    width = deepest + 1
    max_width = max(1, min(min(spatial) // 4, 8))
    if width <= max_width and (min(spatial) - 1) // 2 >= width:
        return "border", width
    if shallowest >= 1:
        return "interior", None
    return "everywhere", None


# =========================================================================== result types
@dataclass(frozen=True)
class OutputCheck:
    """One output (or shared intermediate tensor) compared on one device."""

    name: str
    device: str
    dtype: str
    shape: tuple[int, ...]
    rtol: float
    atol: float
    exact: bool
    comparison: Comparison | None  # None when the tensors could not be compared at all
    problem: str = ""  # why they could not be compared (shape or dtype differs)

    @property
    def passed(self) -> bool:
        return self.comparison is not None and self.comparison.passed

    @property
    def max_abs_error(self) -> float:
        return math.inf if self.comparison is None else self.comparison.max_abs_error

    @property
    def max_rel_error(self) -> float:
        return math.inf if self.comparison is None else self.comparison.max_rel_error

    @property
    def tolerance(self) -> float:
        """Absolute tolerance applied: ``rtol * scale + atol`` (0 for exact outputs)."""
        return 0.0 if self.comparison is None else self.comparison.tolerance

    def verdict(self) -> str:
        """``ok``, or ``FAIL`` with how many elements and where."""
        if self.comparison is None:
            return f"FAIL: {self.problem}"
        c = self.comparison
        if c.passed:
            return "ok"
        where = self.where()
        return f"FAIL: {c.mismatched:,} of {c.total:,} elements" + (f", {where}" if where else "")

    def where(self) -> str:
        """Where a failing tensor is wrong: non-finite values, border ring, interior, everywhere."""
        c = self.comparison
        if c is None or c.passed:
            return ""
        parts = ["non-finite values differ"] if c.max_abs_error == math.inf else []
        if c.location == "border":
            inner = c.interior_max_abs_error or 0.0
            rel = inner / c.scale if c.scale > 0 else inner
            parts.append(
                f"on the border only (ring width {c.border_width}, interior max rel err {rel:.1e}): "
                "a padding mistake?"
            )
        elif c.location:
            parts.append(c.location)
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {
            "name": self.name,
            "device": self.device,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "passed": self.passed,
            "exact": self.exact,
            "rtol": self.rtol,
            "atol": self.atol,
            "tolerance": _finite(self.tolerance),
            "max_abs_error": _finite(self.max_abs_error),
            "max_rel_error": _finite(self.max_rel_error),
            "scale": None if c is None else _finite(c.scale),
            "mismatched": None if c is None else c.mismatched,
            "total": None if c is None else c.total,
            "location": None if c is None else c.location,
            "border_width": None if c is None else c.border_width,
            "interior_max_abs_error": None if c is None else _finite(c.interior_max_abs_error),
            "problem": self.problem,
        }


@dataclass(frozen=True)
class Suspect:
    """The first place the candidate diverges: a shared tensor and the nodes that produce it.

    ``candidate_nodes`` are the candidate's nodes between the last matching shared tensors and
    ``check.name`` (typically one merged Conv); ``reference_nodes`` the reference nodes they
    replace.
    """

    check: OutputCheck
    candidate_nodes: tuple[str, ...]
    reference_nodes: tuple[str, ...]

    def line(self) -> str:
        cand = ", ".join(self.candidate_nodes) or "no node"
        ref = ", ".join(self.reference_nodes) or "no node"
        where = self.check.where()
        return (
            f"first divergence: tensor '{self.check.name}' from candidate {cand} (reference: {ref}): "
            f"max rel err {_sci(self.check.max_rel_error)}" + (f", {where}" if where else "")
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.check.name,
            "candidate_nodes": list(self.candidate_nodes),
            "reference_nodes": list(self.reference_nodes),
            "check": self.check.to_dict(),
        }


@dataclass(frozen=True)
class VerifyResult:
    """Every output compared on every device, and what was run to get there."""

    kind: str  # "onnx" or "torch"
    reference: str
    candidate: str
    checks: tuple[OutputCheck, ...]
    devices: tuple[str, ...]
    samples: int
    seed: int
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...] = ()  # (name, dtype, shape) as run
    notes: tuple[str, ...] = ()
    suspects: tuple[Suspect, ...] = ()

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0 when the candidate matches, 1 when it does not (2 is for errors, raised instead)."""
        return 0 if self.passed else 1

    @property
    def failed(self) -> tuple[OutputCheck, ...]:
        return tuple(c for c in self.checks if not c.passed)

    def to_text(self) -> str:
        where = ", ".join(self.devices)
        runs = f"{where}; {self.samples} sample{'s' if self.samples != 1 else ''}, seed {self.seed}"
        if self.passed:
            head = f"PASS: candidate {self.candidate} matches reference {self.reference} ({runs})"
        else:
            head = (
                f"FAIL: {len(self.failed)} of {len(self.checks)} output checks differ: candidate "
                f"{self.candidate} vs reference {self.reference} ({runs})"
            )
        rows = [("output", "device", "dtype", "shape", "max abs err", "max rel err", "rel tol", "result")]
        for c in self.checks:
            rows.append(
                (
                    c.name,
                    c.device,
                    c.dtype,
                    _dims(c.shape),
                    _sci(c.max_abs_error),
                    _sci(c.max_rel_error),
                    "exact" if c.exact else _tol_text(c.rtol, c.atol),
                    c.verdict(),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = [head]
        lines += ["  " + "  ".join(f"{v:<{w}}" for v, w in zip(r, widths)) + "  " + r[-1] for r in rows]
        if self.inputs:
            lines.append("inputs: " + ", ".join(f"{n} {d} {_dims(s)}" for n, d, s in self.inputs))
        lines += [s.line() for s in self.suspects]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(line.rstrip() for line in lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "exit_code": self.exit_code,
            "kind": self.kind,
            "reference": self.reference,
            "candidate": self.candidate,
            "devices": list(self.devices),
            "samples": self.samples,
            "seed": self.seed,
            "inputs": [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in self.inputs],
            "outputs": [c.to_dict() for c in self.checks],
            "suspects": [s.to_dict() for s in self.suspects],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        return self.to_text()


def _finite(x: float | None) -> float | None:
    """JSON-safe float: non-finite values become null (the ``problem``/verdict says why)."""
    return x if x is None or math.isfinite(x) else None


def _sci(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.1e}"


def _dims(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _tol_text(rtol: float, atol: float) -> str:
    return f"{rtol:.0e}" + (f"+abs {atol:.0e}" if atol else "")


def _one_line(error: BaseException) -> str:
    """An exception's message on one line (ONNX Runtime's span several)."""
    text = " ".join(part.strip() for part in str(error).splitlines() if part.strip())
    return text or type(error).__name__


def _ort_message(error: BaseException) -> str:
    """ONNX Runtime's message without its status prefix and C++ source location."""
    text = _one_line(error)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"\S*onnxruntime_src\S*\s+(?:\S+\(.*?\)\s+)?", "", text)
    return text.strip() or _one_line(error)


# =========================================================================== inputs
@dataclass(frozen=True)
class _Port:
    """A graph input or output as declared: element type and dims (int, symbol name or None)."""

    name: str
    elem_type: int
    dims: tuple[int | str | None, ...] | None  # None when the rank is not declared

    @property
    def dtype(self) -> str:
        return _ONNX_DTYPES[self.elem_type][0] if self.elem_type in _ONNX_DTYPES else f"onnx-type-{self.elem_type}"


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input=1x3x224x224"`` -> ``("input", (1, 3, 224, 224))`` (``,`` also separates dims)."""
    name, sep, dims = text.rpartition("=")
    if not sep or not name:
        raise ConvfuseError(f"--shape {text!r} is not NAME=DIMS (e.g. input=1x3x224x224)")
    parts = [p for p in dims.replace(",", "x").split("x") if p.strip()] if dims.strip() else []
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise ConvfuseError(f"--shape {text!r}: dims must be integers separated by 'x'") from None
    if any(d < 1 for d in shape):
        raise ConvfuseError(f"--shape {text!r}: dims must be >= 1")
    return name, shape


def load_inputs(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file by name: one sample of model inputs."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):  # pragma: no cover - np.load returned a bare array
                raise ValueError("not an .npz archive")
            return {name: np.asarray(data[name]) for name in data.files}
    except FileNotFoundError:
        raise ConvfuseError(f"inputs file '{os.fspath(path)}' does not exist") from None
    except ConvfuseError:
        raise
    except Exception as e:  # numpy raises ValueError, OSError, BadZipFile... for a bad file
        raise ConvfuseError(f"inputs file '{os.fspath(path)}' is not an .npz of arrays: {_one_line(e)}") from None


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even), as uint16 bit patterns."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


def _bfloat16_values(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns as float32 values."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Standard normal floats, integers in ``[0, _INT_HIGH)``, fair bools; held as ``_ONNX_DTYPES``."""
    if dtype in DEFAULT_RTOL:
        values = rng.standard_normal(shape)
        return _bfloat16_bits(values) if dtype == "bfloat16" else values.astype(dtype)
    if dtype == "bool":
        return rng.random(shape) < 0.5
    return rng.integers(0, _INT_HIGH, size=shape).astype(dtype)


def _generate(specs: Sequence[tuple[str, str, tuple[int, ...]]], samples: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``samples`` input sets; sample ``k`` depends only on ``(seed, k)`` and the specs."""
    feeds = []
    for k in range(samples):
        rng = np.random.default_rng([seed, k])
        feeds.append({name: _random_array(rng, dtype, shape) for name, dtype, shape in specs})
    return feeds


# =========================================================================== ONNX plumbing
def _ort() -> Any:
    """onnxruntime, imported on first use (``import convfuse`` stays light)."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)
    return onnxruntime


def _cuda_in_ort() -> bool:
    return "CUDAExecutionProvider" in _ort().get_available_providers()


def _cuda_in_torch() -> bool:
    return torch.cuda.is_available()


def _resolve_devices(device: str, cuda_available: Callable[[], bool], where: str) -> tuple[list[str], list[str]]:
    """Devices to run on and notes; CUDA asked for but absent raises, ``all`` notes its absence."""
    if device not in DEVICES:
        raise ConvfuseError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return ["cpu"], []
    if cuda_available():
        return (["cpu", "cuda"] if device == "all" else ["cuda"]), []
    if device == "cuda":
        raise DeviceUnavailableError(f"CUDA was requested but {where}; verify on device cpu (or all)")
    return ["cpu"], [f"cuda not checked: {where}"]


def load_model(source: str | os.PathLike[str] | onnx.ModelProto, what: str = "model") -> onnx.ModelProto:
    """An ONNX model from a path (or the ModelProto itself), or :class:`InvalidModelError` saying why not."""
    if isinstance(source, onnx.ModelProto):
        model = source
        label = what
    else:
        path = os.fspath(source)
        label = f"{what} '{path}'"
        if not os.path.exists(path):
            raise InvalidModelError(f"{label} does not exist")
        if os.path.isdir(path):
            raise InvalidModelError(f"{label} is a directory, not an ONNX file")
        try:
            model = onnx.load(path)
        except Exception as e:  # protobuf DecodeError, missing external data, ...
            raise InvalidModelError(f"{label} is not a readable ONNX model: {_one_line(e)}") from None
    if not model.HasField("graph") or not model.graph.output:
        raise InvalidModelError(f"{label} is not an ONNX model (no graph or no outputs)")
    return model


def _label(source: str | os.PathLike[str] | onnx.ModelProto) -> str:
    if isinstance(source, onnx.ModelProto):
        return f"<ModelProto {source.graph.name!r}>" if source.graph.name else "<ModelProto>"
    return os.fspath(source)


def _port(value_info: onnx.ValueInfoProto) -> _Port:
    t = value_info.type
    if not t.HasField("tensor_type"):
        return _Port(value_info.name, -1, None)
    tt = t.tensor_type
    if not tt.HasField("shape"):
        return _Port(value_info.name, tt.elem_type, None)
    dims: list[int | str | None] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        else:
            dims.append(d.dim_param or None)
    return _Port(value_info.name, tt.elem_type, tuple(dims))


def _signature(model: onnx.ModelProto) -> tuple[list[_Port], list[_Port]]:
    """Inputs the caller must feed (initializers excluded) and outputs, as declared."""
    initialized = {t.name for t in model.graph.initializer}
    inputs = [_port(v) for v in model.graph.input if v.name not in initialized]
    outputs = [_port(v) for v in model.graph.output]
    return inputs, outputs


def _check_same_names(kind: str, ref: Sequence[_Port], cand: Sequence[_Port]) -> None:
    ref_names, cand_names = [p.name for p in ref], [p.name for p in cand]
    if set(ref_names) != set(cand_names):
        only_ref = sorted(set(ref_names) - set(cand_names))
        only_cand = sorted(set(cand_names) - set(ref_names))
        raise InvalidModelError(
            f"reference and candidate must have the same {kind} names: only in reference: "
            f"{', '.join(only_ref) or '-'}; only in candidate: {', '.join(only_cand) or '-'}"
        )


def _input_specs(
    ref: Sequence[_Port],
    cand: Sequence[_Port],
    shapes: Mapping[str, Sequence[int]] | None,
    notes: list[str],
) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(name, dtype, shape)`` per input: declared dims of both models, ``shapes`` for symbols, else 1."""
    shapes = dict(shapes or {})
    cand_by_name = {p.name: p for p in cand}
    unknown = sorted(set(shapes) - {p.name for p in ref})
    if unknown:
        raise ConvfuseError(
            f"shape given for {', '.join(unknown)}, which is not a model input "
            f"(inputs: {', '.join(p.name for p in ref)})"
        )
    specs = []
    for r in ref:
        c = cand_by_name[r.name]
        if r.elem_type != c.elem_type:
            raise InvalidModelError(f"input '{r.name}' is {r.dtype} in the reference but {c.dtype} in the candidate")
        if r.elem_type not in _ONNX_DTYPES:
            raise InvalidModelError(f"input '{r.name}' has type {r.dtype}, which the verifier cannot generate")
        declared = _merge_dims(r, c)
        given = shapes.get(r.name)
        if given is not None:
            given = tuple(int(d) for d in given)
            if declared is not None and (
                len(given) != len(declared)
                or any(isinstance(d, int) and d != g for d, g in zip(declared, given))
            ):
                raise ConvfuseError(
                    f"shape {_dims(given)} for input '{r.name}' does not fit its declared shape "
                    f"{_declared(declared)}"
                )
            specs.append((r.name, r.dtype, given))
            continue
        if declared is None:
            raise InvalidModelError(f"input '{r.name}' has no declared shape; give one with --shape {r.name}=DIMS")
        resolved = []
        for axis, d in enumerate(declared):
            if isinstance(d, int):
                resolved.append(d)
            else:
                resolved.append(1)
                symbol = f" ('{d}')" if d else ""
                notes.append(
                    f"input '{r.name}' dim {axis}{symbol} is symbolic: used 1 "
                    f"(choose with --shape {r.name}=DIMS or shapes=)"
                )
        specs.append((r.name, r.dtype, tuple(resolved)))
    return specs


def _merge_dims(ref: _Port, cand: _Port) -> tuple[int | str | None, ...] | None:
    """Declared dims of an input in both models: a fixed dim in either wins; they must agree."""
    if ref.dims is None or cand.dims is None:
        return ref.dims if cand.dims is None else cand.dims
    if len(ref.dims) != len(cand.dims):
        raise InvalidModelError(
            f"input '{ref.name}' has rank {len(ref.dims)} in the reference but {len(cand.dims)} in the candidate"
        )
    merged: list[int | str | None] = []
    for a, b in zip(ref.dims, cand.dims):
        if isinstance(a, int) and isinstance(b, int) and a != b:
            raise InvalidModelError(
                f"input '{ref.name}' is {_declared(ref.dims)} in the reference but "
                f"{_declared(cand.dims)} in the candidate"
            )
        merged.append(a if isinstance(a, int) else b)
    return tuple(merged)


def _declared(dims: Sequence[int | str | None]) -> str:
    return "x".join("?" if d is None else str(d) for d in dims) if dims else "scalar"


def _given_feeds(
    inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    ref: Sequence[_Port],
    cand: Sequence[_Port],
) -> list[dict[str, np.ndarray]]:
    """Caller-supplied input sets, checked against the declared names, dtypes and dims."""
    sets = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    if not sets:
        raise ConvfuseError("no input sets given")
    cand_by_name = {p.name: p for p in cand}
    names = [p.name for p in ref]
    feeds = []
    for given in sets:
        missing = [n for n in names if n not in given]
        extra = sorted(set(given) - set(names))
        if missing or extra:
            raise ConvfuseError(
                f"inputs must name exactly the model inputs ({', '.join(names)}): "
                f"missing {', '.join(missing) or '-'}; not inputs {', '.join(extra) or '-'}"
            )
        feed = {}
        for port in ref:
            array = np.asarray(given[port.name])
            if port.elem_type not in _ONNX_DTYPES:
                raise InvalidModelError(f"input '{port.name}' has type {port.dtype}, which the verifier cannot feed")
            if port.dtype == "bfloat16" and array.dtype.kind == "f":
                array = _bfloat16_bits(array)  # floats given for a bfloat16 input: round them
            expected = np.dtype(_ONNX_DTYPES[port.elem_type][1])
            if array.dtype != expected:
                raise ConvfuseError(f"input '{port.name}' is declared {port.dtype} but the array given is {array.dtype}")
            declared = _merge_dims(port, cand_by_name[port.name])
            if declared is not None and (
                array.ndim != len(declared)
                or any(isinstance(d, int) and d != s for d, s in zip(declared, array.shape))
            ):
                raise ConvfuseError(
                    f"input '{port.name}' has shape {_dims(array.shape)}, which does not fit its declared "
                    f"shape {_declared(declared)}"
                )
            feed[port.name] = array
        feeds.append(feed)
    return feeds


def _session(model: onnx.ModelProto, device: str, what: str) -> Any:
    """An ONNX Runtime session on ``device`` with graph optimizations off (the graph as written).

    Both models get the same settings; with optimizations off ORT does not fold Conv+BN itself,
    so the reference computes exactly what its graph says.
    """
    ort = _ort()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
    except Exception as e:  # ORT raises its own Fail/InvalidGraph/NotImplemented types
        raise InvalidModelError(f"onnxruntime cannot load the {what}: {_ort_message(e)}") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise DeviceUnavailableError(
            f"onnxruntime could not start its CUDA provider for the {what} (no usable GPU or CUDA libraries)"
        )
    return session


def _run_session(
    session: Any, feed: Mapping[str, np.ndarray], ports: Mapping[str, _Port], names: Sequence[str], what: str
) -> dict[str, np.ndarray]:
    """Run ``session`` and return outputs ``names``: floats as float64, others as they are."""
    ort = _ort()
    values = {}
    for name, array in feed.items():
        if ports[name].elem_type == TensorProto.BFLOAT16:
            values[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(
                np.ascontiguousarray(array), TensorProto.BFLOAT16
            )
        else:
            values[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array))
    try:
        results = session.run_with_ort_values(list(names), values)
    except Exception as e:
        raise InvalidModelError(f"onnxruntime failed to run the {what}: {_ort_message(e)}") from None
    outputs = {}
    for name, value in zip(names, results):
        if not value.is_tensor():
            raise InvalidModelError(f"output '{name}' of the {what} is not a tensor; only tensors are compared")
        if value.data_type() == "tensor(bfloat16)":
            raw = ctypes.string_at(value.data_ptr(), value.tensor_size_in_bytes())
            array = _bfloat16_values(np.frombuffer(raw, dtype=np.uint16).reshape(value.shape()))
        else:
            array = value.numpy()
        outputs[name] = array.astype(np.float64) if array.dtype.kind == "f" else array
    return outputs


def _dtype_of(array: np.ndarray, declared: _Port | None) -> str:
    if declared is not None and declared.elem_type in _ONNX_DTYPES:
        return declared.dtype
    return str(array.dtype)


def _check(
    name: str,
    device: str,
    dtype: str,
    cand_dtype: str,
    refs: Sequence[np.ndarray],
    cands: Sequence[np.ndarray],
    rtol: float | None,
    atol: float | None,
) -> OutputCheck:
    """Compare one tensor over all samples (stacked on a new leading axis)."""
    r_tol, a_tol, exact = tolerance_for(dtype, rtol, atol)
    shape = tuple(refs[0].shape)
    cand_shape = tuple(cands[0].shape)
    if cand_dtype != dtype:
        return OutputCheck(name, device, dtype, shape, r_tol, a_tol, exact, None, f"candidate dtype is {cand_dtype}")
    if cand_shape != shape:
        return OutputCheck(name, device, dtype, shape, r_tol, a_tol, exact, None, f"candidate shape is {_dims(cand_shape)}")
    spatial_from = 3 if len(shape) >= 3 else None  # [samples, N, C, *spatial]
    comparison = compare(np.stack(refs), np.stack(cands), rtol=r_tol, atol=a_tol, exact=exact, spatial_from=spatial_from)
    return OutputCheck(name, device, dtype, shape, r_tol, a_tol, exact, comparison)


def verify_onnx(
    reference: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    *,
    device: str = "cpu",
    samples: int = 2,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    inputs: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    attribution: bool = True,
) -> VerifyResult:
    """Run two ONNX models on the same inputs with ONNX Runtime and compare every output.

    Inputs: ``inputs`` (one mapping, or a sequence of them, each one sample) or ``samples``
    random sets from ``seed`` shaped by the declared dims, ``shapes`` for symbolic ones (else 1,
    noted). When an output fails and ``attribution`` is on, :func:`attribute` names the first
    diverging region. Raises :class:`ConvfuseError` for unusable input and
    :class:`DeviceUnavailableError` for ``device="cuda"`` without CUDA.
    """
    if samples < 1:
        raise ConvfuseError(f"samples must be >= 1, got {samples}")
    ref_model, cand_model = load_model(reference, "reference"), load_model(candidate, "candidate")
    ref_in, ref_out = _signature(ref_model)
    cand_in, cand_out = _signature(cand_model)
    _check_same_names("input", ref_in, cand_in)
    _check_same_names("output", ref_out, cand_out)
    notes: list[str] = []
    devices, device_notes = _resolve_devices(
        device, _cuda_in_ort, "onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu on a GPU machine)"
    )
    notes += device_notes
    if inputs is not None:
        if shapes:
            raise ConvfuseError("give either inputs or shapes, not both (inputs fix the shapes)")
        feeds = _given_feeds(inputs, ref_in, cand_in)
        notes.append(f"inputs given by the caller: {len(feeds)} sample(s), no random inputs")
    else:
        specs = _input_specs(ref_in, cand_in, shapes, notes)
        feeds = _generate(specs, samples, seed)
    ports = {p.name: p for p in ref_in}
    input_info = tuple((p.name, p.dtype, tuple(int(d) for d in feeds[0][p.name].shape)) for p in ref_in)
    ref_out_ports = {p.name: p for p in ref_out}
    cand_out_ports = {p.name: p for p in cand_out}
    names = [p.name for p in ref_out]

    checks: list[OutputCheck] = []
    suspects: tuple[Suspect, ...] = ()
    for dev in devices:
        ref_session = _session(ref_model, dev, "reference")
        cand_session = _session(cand_model, dev, "candidate")
        ref_runs = [_run_session(ref_session, f, ports, names, "reference") for f in feeds]
        cand_runs = [_run_session(cand_session, f, ports, names, "candidate") for f in feeds]
        dev_checks = [
            _check(
                name,
                dev,
                _dtype_of(ref_runs[0][name], ref_out_ports[name]),
                _dtype_of(cand_runs[0][name], cand_out_ports[name]),
                [r[name] for r in ref_runs],
                [c[name] for c in cand_runs],
                rtol,
                atol,
            )
            for name in names
        ]
        checks += dev_checks
        if attribution and not suspects and not all(c.passed for c in dev_checks):
            try:
                suspects = attribute(ref_model, cand_model, feeds=feeds, device=dev, rtol=rtol, atol=atol, notes=notes)
            except ConvfuseError as e:  # a mismatch stays a mismatch even if attribution cannot run
                notes.append(f"attribution failed: {e}")
    return VerifyResult(
        kind="onnx",
        reference=_label(reference),
        candidate=_label(candidate),
        checks=tuple(checks),
        devices=tuple(devices),
        samples=len(feeds),
        seed=seed,
        inputs=input_info,
        notes=tuple(notes),
        suspects=suspects,
    )


# =========================================================================== attribution
def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    return {out: i for i, node in enumerate(graph.node) for out in node.output if out}


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} '{node.name}'" if node.name else f"{node.op_type} #{index}"


def _region(
    graph: onnx.GraphProto, producers: Mapping[str, int], tensor: str, boundary: Callable[[str], bool]
) -> tuple[list[int], set[str]]:
    """Nodes computing ``tensor`` back to ``boundary`` tensors or graph inputs; boundaries reached."""
    nodes: set[int] = set()
    reached: set[str] = set()
    stack = [tensor]
    seen = set()
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name != tensor and boundary(name):
            reached.add(name)
            continue
        index = producers.get(name)
        if index is None or index in nodes:
            continue
        nodes.add(index)
        stack.extend(i for i in graph.node[index].input if i)
    return sorted(nodes), reached


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor ONNX shape inference can type (empty when inference fails)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a convenience here; untyped tensors are just not compared
        inferred = model
    graph = inferred.graph
    types = {}
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types


def _with_outputs(model: onnx.ModelProto, extra: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``extra`` (name -> element type)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name, elem_type in extra.items():
        if name not in present:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    return out


def attribute(
    reference: onnx.ModelProto | str | os.PathLike[str],
    candidate: onnx.ModelProto | str | os.PathLike[str],
    *,
    feeds: Sequence[Mapping[str, np.ndarray]] | None = None,
    device: str = "cpu",
    samples: int = 1,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    aliases: Mapping[str, str] | None = None,
    notes: list[str] | None = None,
) -> tuple[Suspect, ...]:
    """Name the regions where ``candidate`` first diverges from ``reference``.

    Every tensor a candidate node produces that the reference also has (same name, or mapped by
    ``aliases`` candidate name -> reference name) is exposed as an extra output of both models
    and compared. A diverging shared tensor is a *first* divergence when the candidate nodes
    computing it from the nearest shared tensors read no diverging shared tensor; those nodes
    (typically one merged Conv), and the reference nodes between the same boundaries, form the
    :class:`Suspect`. Front ends need only keep the names of region boundary tensors.
    """
    ref_model, cand_model = load_model(reference, "reference"), load_model(candidate, "candidate")
    notes = [] if notes is None else notes
    ref_in, _ = _signature(ref_model)
    cand_in, _ = _signature(cand_model)
    _check_same_names("input", ref_in, cand_in)
    if feeds is None:
        feeds = _generate(_input_specs(ref_in, cand_in, shapes, []), samples, seed)
    aliases = dict(aliases or {})
    ref_graph, cand_graph = ref_model.graph, cand_model.graph
    ref_producers, cand_producers = _producers(ref_graph), _producers(cand_graph)
    ref_types, cand_types = _tensor_types(ref_model), _tensor_types(cand_model)

    # Shared tensors in candidate topological order: cand name -> ref name.
    shared: dict[str, str] = {}
    for node in cand_graph.node:
        for out in node.output:
            ref_name = aliases.get(out, out)
            if out and ref_name in ref_producers:
                shared[out] = ref_name
    untyped = [c for c, r in shared.items() if not (cand_types.get(c) and ref_types.get(r))]
    for c in untyped:
        del shared[c]
    if untyped:
        notes.append(f"attribution skipped {len(untyped)} shared tensor(s) whose type shape inference could not tell")

    ref_extra = {r: ref_types[r] for r in shared.values()}
    cand_extra = {c: cand_types[c] for c in shared}
    ref_session = _session(_with_outputs(ref_model, ref_extra), device, "reference (attribution)")
    cand_session = _session(_with_outputs(cand_model, cand_extra), device, "candidate (attribution)")
    ports = {p.name: p for p in ref_in}
    ref_runs = [_run_session(ref_session, f, ports, list(ref_extra), "reference") for f in feeds]
    cand_runs = [_run_session(cand_session, f, ports, list(cand_extra), "candidate") for f in feeds]

    checks: dict[str, OutputCheck] = {}
    for c, r in shared.items():
        ref_dtype = _ONNX_DTYPES.get(ref_types[r], (str(ref_runs[0][r].dtype),))[0]
        cand_dtype = _ONNX_DTYPES.get(cand_types[c], (str(cand_runs[0][c].dtype),))[0]
        checks[c] = _check(c, device, ref_dtype, cand_dtype, [x[r] for x in ref_runs], [x[c] for x in cand_runs], rtol, atol)

    ref_names = set(shared.values())
    suspects = []
    for c, check in checks.items():
        if check.passed:
            continue
        cand_nodes, cand_reached = _region(cand_graph, cand_producers, c, lambda t: t in checks)
        if any(not checks[t].passed for t in cand_reached):
            continue  # inherits a divergence from upstream
        ref_nodes, _ = _region(ref_graph, ref_producers, shared[c], lambda t: t in ref_names)
        suspects.append(
            Suspect(
                check=check,
                candidate_nodes=tuple(_node_label(cand_graph.node[i], i) for i in cand_nodes),
                reference_nodes=tuple(_node_label(ref_graph.node[i], i) for i in ref_nodes),
            )
        )
    return tuple(suspects)


# =========================================================================== torch modules
def _flatten(value: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """Tensors of a module's output by path: ``output``, ``output[0]``, ``output['key']``..."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if value is None:
        return {}
    if isinstance(value, Mapping):
        out: dict[str, torch.Tensor] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}[{key!r}]"))
        return out
    if isinstance(value, (tuple, list)):
        out = {}
        for i, item in enumerate(value):
            out.update(_flatten(item, f"{prefix}[{i}]"))
        return out
    raise ConvfuseError(f"module output {prefix} is a {type(value).__name__}; only tensors are compared")


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    """Dtype of the module's first floating parameter or buffer (float32 when it has none)."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _eval_copy(module: torch.nn.Module, device: str, what: str, notes: list[str]) -> torch.nn.Module:
    """A deep copy in eval mode on ``device``: the caller's module is never changed."""
    if any(m.training for m in module.modules()):
        notes.append(f"{what} was in training mode: compared a copy in eval mode")
    try:
        return copy.deepcopy(module).eval().to(device)
    except Exception as e:
        raise ConvfuseError(f"cannot copy the {what} module to {device}: {_one_line(e)}") from None


def _as_shape_list(input_shapes: Sequence[int] | Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    items = list(input_shapes)
    if items and all(isinstance(d, int) for d in items):
        return [tuple(int(d) for d in items)]  # one shape
    return [tuple(int(d) for d in s) for s in items]  # type: ignore[union-attr]


def verify_modules(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
    input_shapes: Sequence[int] | Sequence[Sequence[int]] | None = None,
    device: str = "cpu",
    samples: int = 2,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
) -> VerifyResult:
    """Run two modules (eval-mode copies) on the same inputs with torch and compare every output.

    ``example_inputs`` (a tensor or a tuple of positional tensors) is one sample; otherwise
    ``input_shapes`` (one shape or one per positional input) gives ``samples`` standard normal
    sets from ``seed`` in the reference's parameter dtype. Outputs may be a tensor or nested
    tuples, lists and dicts of them; both modules must return the same structure.
    """
    if samples < 1:
        raise ConvfuseError(f"samples must be >= 1, got {samples}")
    notes: list[str] = []
    devices, device_notes = _resolve_devices(device, _cuda_in_torch, "torch.cuda.is_available() is False")
    notes += device_notes
    if example_inputs is not None:
        args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
        if not all(isinstance(a, torch.Tensor) for a in args):
            raise ConvfuseError("example_inputs must be a tensor or a tuple of tensors")
        input_sets = [args]
    elif input_shapes is not None:
        dtype = _module_dtype(reference)
        shape_list = _as_shape_list(input_shapes)
        specs = [(f"input{i}", "float64", s) for i, s in enumerate(shape_list)]
        input_sets = [
            tuple(torch.from_numpy(feed[n]).to(dtype) for n, _, _ in specs) for feed in _generate(specs, samples, seed)
        ]
    else:
        raise ConvfuseError("verifying modules needs example_inputs or input_shapes")
    input_info = tuple(
        (f"input{i}", _TORCH_DTYPES.get(a.dtype, str(a.dtype)), tuple(a.shape)) for i, a in enumerate(input_sets[0])
    )

    checks: list[OutputCheck] = []
    for dev in devices:
        ref = _eval_copy(reference, dev, "reference", notes if dev == devices[0] else [])
        cand = _eval_copy(candidate, dev, "candidate", notes if dev == devices[0] else [])
        ref_runs = [_run_module(ref, args, dev, "reference") for args in input_sets]
        cand_runs = [_run_module(cand, args, dev, "candidate") for args in input_sets]
        if list(ref_runs[0]) != list(cand_runs[0]):
            raise ConvfuseError(
                f"reference and candidate return different outputs: {', '.join(ref_runs[0]) or '-'} vs "
                f"{', '.join(cand_runs[0]) or '-'}"
            )
        for name, first in ref_runs[0].items():
            checks.append(
                _check(
                    name,
                    dev,
                    _TORCH_DTYPES.get(first.dtype, str(first.dtype)),
                    _TORCH_DTYPES.get(cand_runs[0][name].dtype, str(cand_runs[0][name].dtype)),
                    [_to_numpy(r[name]) for r in ref_runs],
                    [_to_numpy(c[name]) for c in cand_runs],
                    rtol,
                    atol,
                )
            )
    return VerifyResult(
        kind="torch",
        reference=type(reference).__name__,
        candidate=type(candidate).__name__,
        checks=tuple(checks),
        devices=tuple(devices),
        samples=len(input_sets),
        seed=seed,
        inputs=input_info,
        notes=tuple(notes),
    )


def _run_module(module: torch.nn.Module, args: tuple[torch.Tensor, ...], device: str, what: str) -> dict[str, torch.Tensor]:
    try:
        with torch.inference_mode():
            return _flatten(module(*(a.to(device) for a in args)))
    except ConvfuseError:
        raise
    except Exception as e:  # the module cannot run on these inputs: bad input, not a mismatch
        shapes = ", ".join(_dims(a.shape) for a in args)
        raise ConvfuseError(f"the {what} module failed on inputs of shape {shapes}: {_one_line(e)}") from None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return t.to(torch.float64).numpy() if t.is_floating_point() else t.numpy()


# =========================================================================== dispatch
def verify(reference: Any, candidate: Any, **options: Any) -> VerifyResult:
    """Compare ``candidate`` with ``reference``: two ONNX models (paths or ModelProto) or two modules.

    ONNX models go to :func:`verify_onnx`, ``nn.Module`` pairs to :func:`verify_modules` (which
    need ``example_inputs`` or ``input_shapes``); see those for the options.
    """
    if isinstance(reference, torch.nn.Module) and isinstance(candidate, torch.nn.Module):
        return verify_modules(reference, candidate, **options)
    onnx_like = (onnx.ModelProto, str, os.PathLike)
    if isinstance(reference, onnx_like) and isinstance(candidate, onnx_like):
        return verify_onnx(reference, candidate, **options)
    raise ConvfuseError(
        "verify needs two ONNX models (paths or ModelProto) or two nn.Modules, got "
        f"{type(reference).__name__} and {type(candidate).__name__}"
    )
