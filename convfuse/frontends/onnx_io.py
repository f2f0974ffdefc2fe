"""Reading and writing ONNX files: validation, external data, atomic writes.

Plumbing only. Every failure a user can cause (a missing, empty or corrupt file; a directory
that does not exist) becomes an :class:`~convfuse.errors.InvalidModelError` or
:class:`~convfuse.errors.OutputError` with a one-line message; the file name is added by the
caller (the CLI prints ``convfuse: error: FILE: MESSAGE``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import onnx
from onnx import external_data_helper, numpy_helper

from ..errors import InvalidModelError, OutputError

__all__ = [
    "MAX_PROTOBUF",
    "LoadedModel",
    "read_model",
    "load_model",
    "check_model",
    "save_model",
    "external_data_name",
]

#: Largest serialised protobuf (2 GiB - 1); bigger models keep their tensors in a data file.
MAX_PROTOBUF = 2**31 - 1

#: Tensors at least this many bytes go to the data file when saving with external data.
_EXTERNAL_THRESHOLD = 1024


@dataclass
class LoadedModel:
    """A model read from disk, with what it takes to write it back the same way."""

    model: onnx.ModelProto
    path: Path
    external_data: bool  # the file keeps (some) tensors in external data files
    total_bytes: int  # the .onnx file plus the external data it loaded


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _graph_tensors(graph: onnx.GraphProto, initializers_only: bool = False) -> Iterator[onnx.TensorProto]:
    """Initializers (and unless ``initializers_only``, attribute tensors) of ``graph`` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if not initializers_only:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g, initializers_only)
            for sub in attr.graphs:
                yield from _graph_tensors(sub, initializers_only)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors


def read_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Read and check an ONNX file, loading external data that sits beside it."""
    p = Path(path)
    if not p.exists():
        raise InvalidModelError("does not exist")
    if p.is_dir():
        raise InvalidModelError("is a directory, not an ONNX file")
    size = p.stat().st_size
    if size == 0:
        raise InvalidModelError("empty file, not an ONNX model")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends: the bytes are not a model
        raise InvalidModelError(f"not an ONNX model ({_one_line(exc)})") from None
    outside = [t for t in _all_tensors(model) if external_data_helper.uses_external_data(t)]
    total = size
    for tensor in outside:
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(p.parent))
        except Exception as exc:
            raise InvalidModelError(f"cannot read external data of {tensor.name!r} ({_one_line(exc)})") from None
        total += len(tensor.raw_data)
    check_model(model, p)
    return LoadedModel(model, p, bool(outside), total)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """:func:`read_model`, returning only the model."""
    return read_model(path).model


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Raise :class:`InvalidModelError` unless ``model`` is an ONNX model the checker accepts."""
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidModelError("not an ONNX model (no graph or no IR version)")
    if any(external_data_helper.uses_external_data(t) for t in _all_tensors(model)):
        raise InvalidModelError(
            "external data is not loaded; pass the file path or load it with load_external_data=True"
        )
    try:
        if model.ByteSize() <= MAX_PROTOBUF:
            onnx.checker.check_model(model)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and C++ errors surfacing as others
        raise InvalidModelError(f"fails the ONNX checker: {_one_line(exc)}") from None


def external_data_name(path: str | os.PathLike[str]) -> str:
    """File name of the data file written beside ``path`` (``model.onnx`` -> ``model.onnx.data``)."""
    return Path(path).name + ".data"


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically (temporary file in the target directory, then rename).

    ``external_data=None`` keeps tensors inside the file unless the model is over 2 GiB; ``True``
    puts every initializer of 1 KiB or more into ``<name>.data`` beside it, also written
    atomically (no data file when no tensor is that large).
    ``model`` itself is never modified. Same model, same bytes.
    """
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError(f"{target}: is a directory")
    if not parent.is_dir():
        raise OutputError(f"{target}: directory {parent} does not exist")
    if external_data is None:
        external_data = model.ByteSize() > MAX_PROTOBUF
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".convfuse-", dir=parent))
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({_one_line(exc)})") from None
    try:
        tmp_model = tmpdir / target.name
        if external_data:
            data_name = external_data_name(target)
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            tmp_data = tmpdir / data_name
            moved = _write_external_data(copy, tmp_data, data_name)
            _write_bytes(tmp_model, copy.SerializeToString())
            if moved:
                os.replace(tmp_data, parent / data_name)
        else:
            _write_bytes(tmp_model, model.SerializeToString())
        os.replace(tmp_model, target)
    except OSError as exc:
        raise OutputError(f"{target}: cannot write ({_one_line(exc)})") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _write_external_data(model: onnx.ModelProto, data_path: Path, location: str) -> int:
    """Move every initializer of ``_EXTERNAL_THRESHOLD`` bytes or more into ``data_path``, in
    order; return how many moved."""
    moved = 0
    with open(data_path, "wb") as f:
        for tensor in _graph_tensors(model.graph, initializers_only=True):
            if tensor.data_type == onnx.TensorProto.STRING:
                continue
            if not tensor.HasField("raw_data"):
                array = numpy_helper.to_array(tensor)
                if array.nbytes < _EXTERNAL_THRESHOLD:
                    continue
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
            if len(tensor.raw_data) < _EXTERNAL_THRESHOLD:
                continue
            offset = f.tell()
            f.write(tensor.raw_data)
            external_data_helper.set_external_data(tensor, location, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
            moved += 1
        f.flush()
        os.fsync(f.fileno())
    return moved


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
