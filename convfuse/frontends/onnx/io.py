"""Reading and writing ONNX files: validation, external data, atomic writes.

Plumbing only. Every failure a user can cause (a missing, empty or corrupt file; a directory
that does not exist) becomes an :class:`~convfuse.errors.InvalidModelError` or
:class:`~convfuse.errors.OutputError` with a one-line message; the file name is added by the
caller (the CLI prints ``convfuse: error: FILE: MESSAGE``).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
from onnx import external_data_helper, helper, numpy_helper

from ...errors import InvalidModelError, OutputError, one_line

__all__ = [
    "MAX_PROTOBUF",
    "is_large",
    "LoadedModel",
    "read_model",
    "check_file",
    "load_model",
    "check_model",
    "save_model",
    "stage_model",
    "StagedModel",
    "external_data_name",
    "node_attributes",
    "subgraphs",
]

#: Largest serialised protobuf (2 GiB - 1); bigger models keep their tensors in a data file.
MAX_PROTOBUF = 2**31 - 1

#: Tensors at least this many bytes go to the data file when saving with external data.
_EXTERNAL_THRESHOLD = 1024

#: What the model holds besides tensors and nodes (value_info, metadata...) is assumed below this.
_LARGE_MARGIN = 64 * 2**20

#: Bytes read from the start of a file to tell text from protobuf.
_SNIFF_BYTES = 512


@dataclass
class LoadedModel:
    """A model read from disk, with what it takes to write it back the same way."""

    model: onnx.ModelProto
    path: Path
    external_data: bool  # the file keeps (some) tensors in external data files
    total_bytes: int  # the .onnx file plus the external data it loaded
    data_files: tuple[Path, ...] = ()  # the external data files it read


def _looks_like_text(head: bytes) -> bool:
    """Whether a file's first bytes are text. An ONNX file starts with a protobuf field tag
    (``ir_version`` is ``0x08``), never a printable character."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        if len(head) < _SNIFF_BYTES:
            return False
        try:  # the sniffed block may end inside a multi-byte character
            text = head[:-4].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return bool(text) and all(c.isprintable() or c in "\t\n\r\f" for c in text)


def _external_location(tensor: onnx.TensorProto) -> str:
    for entry in tensor.external_data:
        if entry.key == "location":
            return entry.value
    return "?"


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


def check_file(path: str | os.PathLike[str]) -> int:
    """The size of ``path`` after the checks that need no parsing: it exists, is a readable
    regular file, is not empty and is not text. :class:`InvalidModelError` saying which failed."""
    p = Path(path)
    if not p.exists():
        raise InvalidModelError("does not exist", path=p)
    if p.is_dir():
        raise InvalidModelError("is a directory, not an ONNX file", path=p)
    if not p.is_file():
        raise InvalidModelError("is not a regular file (a pipe or device?); give an ONNX file", path=p)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as exc:
        raise InvalidModelError(f"cannot read ({exc.strerror or one_line(exc, 300)})", path=p) from None
    if size == 0:
        raise InvalidModelError("empty file, not an ONNX model", path=p)
    if _looks_like_text(head):
        raise InvalidModelError("is a text file, not an ONNX model (ONNX files are binary protobuf)", path=p)
    return size


def read_model(path: str | os.PathLike[str], *, load_external_data: bool = True) -> LoadedModel:
    """Read and check an ONNX file, loading external data that sits beside it.

    Raises :class:`InvalidModelError` (``path`` set, one-line message) for a missing path, a
    directory, an empty, text, corrupt or truncated file, a protobuf that is not a model,
    missing or short external data, and a model the ONNX checker rejects.
    ``load_external_data=False`` checks the data files (present, long enough) without reading
    them: the model keeps its references (to hand the path to ONNX Runtime, say).
    """
    p = Path(path)
    size = check_file(p)
    checked = _passes_checker(p)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except OSError as exc:
        raise InvalidModelError(f"cannot read ({exc.strerror or one_line(exc, 300)})", path=p) from None
    except Exception as exc:  # protobuf DecodeError and friends: the bytes are not a model
        cause = one_line(exc, 300).removeprefix("Error parsing message with type 'onnx.ModelProto': ")
        raise InvalidModelError(
            "not an ONNX model: the bytes do not parse as one (corrupt or truncated file, or another "
            f"format; protobuf: {cause[:1].lower() + cause[1:]})",
            path=p,
        ) from None
    outside = [t for t in _all_tensors(model) if external_data_helper.uses_external_data(t)]
    total = size
    data_files: dict[Path, None] = {}
    for tensor in outside:
        location = _external_location(tensor)
        data_files[p.parent / location] = None
        if not (p.parent / location).is_file():
            raise InvalidModelError(
                f"external data file {location!r} of tensor {tensor.name!r} does not exist beside the model",
                path=p,
            )
        if not load_external_data:
            total += _check_external_range(tensor, p, location)
            continue
        try:
            external_data_helper.load_external_data_for_tensor(tensor, str(p.parent))
        except Exception as exc:
            raise InvalidModelError(
                f"cannot read external data of {tensor.name!r} from {location!r} ({one_line(exc, 300)})",
                path=p,
            ) from None
        total += _tensor_bytes(tensor)  # from dims: reading raw_data would copy the bytes
    if checked:
        pass  # the checker accepted the file before it was loaded
    elif load_external_data or not outside:
        check_model(model, p)
    else:
        try:
            onnx.checker.check_model(str(p))
        except Exception as exc:
            raise InvalidModelError(f"fails the ONNX checker: {one_line(exc, 300)}", path=p) from None
    return LoadedModel(model, p, bool(outside), total, tuple(data_files))


def _passes_checker(path: Path) -> bool:
    """Whether the ONNX checker accepts the file at ``path``, checked before the model is loaded
    here: the C++ checker reads the file itself, so no serialised copy of the weights is made and
    its memory is free again before Python's copy exists. On failure :func:`read_model` goes on
    to load and check the model in Python, for the message that says what is wrong."""
    try:
        onnx.checker.check_model(str(path))
    except Exception:
        return False
    return True


def _check_external_range(tensor: onnx.TensorProto, path: Path, location: str) -> int:
    """The length of ``tensor``'s external data, after checking its file holds that many bytes."""
    info = {entry.key: entry.value for entry in tensor.external_data}
    offset = int(info["offset"]) if info.get("offset", "").isdigit() else 0
    if info.get("length", "").isdigit():
        length = int(info["length"])
    else:  # no length given: the tensor's own size
        length = _tensor_bytes(onnx.TensorProto(dims=tensor.dims, data_type=tensor.data_type, raw_data=b""))
    available = (path.parent / location).stat().st_size
    if offset + length > available:
        raise InvalidModelError(
            f"cannot read external data of {tensor.name!r} from {location!r} "
            f"({length} bytes at offset {offset}, file holds {available})",
            path=path,
        )
    return length


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """:func:`read_model`, returning only the model."""
    return read_model(path).model


def check_model(model: onnx.ModelProto, path: Path | None = None) -> None:
    """Raise :class:`InvalidModelError` unless ``model`` is an ONNX model the checker accepts."""
    if not isinstance(model, onnx.ModelProto):
        raise InvalidModelError(
            f"expected an onnx.ModelProto or a path, got {type(model).__name__}", path=path
        )
    if not model.HasField("graph") or model.ir_version == 0:
        raise InvalidModelError(
            "a protobuf message but not an ONNX model (no graph or no IR version)", path=path
        )
    if any(external_data_helper.uses_external_data(t) for t in _all_tensors(model)):
        raise InvalidModelError(
            "external data is not loaded; pass the file path or load it with load_external_data=True",
            path=path,
        )
    try:
        if not is_large(model):
            onnx.checker.check_model(model)
        elif path is not None:
            onnx.checker.check_model(str(path))
    except Exception as exc:  # onnx.checker.ValidationError and C++ errors surfacing as others
        raise InvalidModelError(f"fails the ONNX checker: {one_line(exc, 300)}", path=path) from None


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data, counted from its dims and fields without copying the data."""
    if external_data_helper.uses_external_data(tensor):
        return 0
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(v) for v in tensor.string_data)
    if tensor.HasField("raw_data"):
        try:
            itemsize = helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
        except Exception:  # an unknown type code: the checker reports it
            itemsize = 8
        return math.prod(tensor.dims) * itemsize
    return 4 * (len(tensor.float_data) + len(tensor.int32_data)) + 8 * (
        len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data)
    )


def is_large(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is too big to serialise as one protobuf (2 GiB), so it must be saved with
    external data and checked or run from a file. Estimated from the tensors' sizes and the
    nodes without serialising (or copying) the whole model; errs on the large side."""
    total = sum(_tensor_bytes(t) for t in _all_tensors(model))
    total += sum(node.ByteSize() for node in model.graph.node)
    return total > MAX_PROTOBUF - _LARGE_MARGIN


def external_data_name(path: str | os.PathLike[str]) -> str:
    """File name of the data file written beside ``path`` (``model.onnx`` -> ``model.onnx.data``)."""
    return Path(path).name + ".data"


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> None:
    """Write ``model`` to ``path`` atomically (temporary files in the target directory, then rename).

    ``external_data=None`` keeps tensors inside the file unless the model is over 2 GiB; ``True``
    puts every initializer of 1 KiB or more into ``<name>.data`` beside it (no data file when
    no tensor is that large). Both files are written and synced before either is renamed into
    place; if the second rename fails the first is rolled back, so a failure (disk full, an
    interrupt) leaves no partial file and whatever was at the target as it was. ``model`` itself
    is never modified and its tensors are not copied. Same model, same bytes.
    Raises :class:`OutputError` (``path`` set) when the target cannot be written.
    """
    with stage_model(model, path, external_data=external_data) as staged:
        staged.commit()


class StagedModel:
    """A model written to temporary files in its target directory, not yet renamed into place.

    ``path`` is a complete ONNX file (its data file beside it) that can be loaded or verified;
    :meth:`commit` renames it (and its data) to the target; leaving the ``with`` block without
    committing deletes it. Made by :func:`stage_model`.
    """

    def __init__(self, target: Path, scratch: Path, path: Path, renames: list[tuple[Path, Path]]) -> None:
        self.target = target
        self.path = path
        self._scratch = scratch
        self._renames = renames

    def commit(self) -> None:
        """Rename the staged files to the target (:class:`OutputError` if that fails)."""
        try:
            _commit(self._renames, self._scratch)
        except OSError as exc:
            raise OutputError(
                f"cannot write ({exc.strerror or one_line(exc, 300)})", path=self.target
            ) from None

    def discard(self) -> None:
        """Delete whatever is left of the temporary files."""
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> StagedModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def stage_model(
    model: onnx.ModelProto,
    path: str | os.PathLike[str],
    *,
    external_data: bool | None = None,
) -> StagedModel:
    """Write ``model`` for ``path`` into a temporary directory beside it (see :func:`save_model`)."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise OutputError("is a directory", path=target)
    if not parent.is_dir():
        raise OutputError(f"directory {parent} does not exist", path=target)
    if external_data is None:
        external_data = is_large(model)
    elif not external_data and is_large(model):
        raise OutputError("the model is over 2 GiB; save it with external data", path=target)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".convfuse-", dir=parent))
    except OSError as exc:
        raise OutputError(
            f"cannot write in {parent} ({exc.strerror or one_line(exc, 300)})", path=target
        ) from None
    try:
        tmp_model = scratch / target.name
        renames = []
        if external_data:
            data_name = external_data_name(target)
            tmp_data = scratch / data_name
            skeleton, moved = _externalised(model, tmp_data, data_name)
            _write_bytes(tmp_model, skeleton.SerializeToString())
            del skeleton
            if moved:
                renames.append((tmp_data, parent / data_name))
            else:
                tmp_data.unlink()
        else:
            _write_model(tmp_model, model)
        renames.append((tmp_model, target))
    except BaseException as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write ({exc.strerror or one_line(exc, 300)})", path=target) from None
        raise
    return StagedModel(target, scratch, tmp_model, renames)


def _repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 5; older ones have ``label``
    return bool(flag) if flag is not None else field.label == field.LABEL_REPEATED


def _copy_fields(dst: Any, src: Any, skip: frozenset[str]) -> None:
    """Copy every set field of protobuf message ``src`` into ``dst`` except those named in ``skip``."""
    for field, value in src.ListFields():
        if field.name not in skip:
            _set_field(dst, field, value)


def _set_field(dst: Any, field: Any, value: Any) -> None:
    """Set ``field`` of message ``dst`` to ``value`` (a copy: protobuf never shares)."""
    if _repeated(field):
        getattr(dst, field.name).extend(value)
    elif field.type == field.TYPE_MESSAGE:
        getattr(dst, field.name).CopyFrom(value)
    else:
        setattr(dst, field.name, value)


_DATA_FIELDS = frozenset(
    {"raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data"}
)


def _externalised(model: onnx.ModelProto, data_path: Path, location: str) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose initializers of ``_EXTERNAL_THRESHOLD`` bytes or more (subgraphs
    included) point into ``data_path``, written here in order; and how many moved.

    The copy never holds those tensors' data, so saving a model takes about one tensor's worth
    of memory beyond the model itself.
    """
    skeleton = onnx.ModelProto()
    _copy_fields(skeleton, model, frozenset({"graph"}))
    _copy_fields(skeleton.graph, model.graph, frozenset({"initializer"}))
    moved = 0
    with open(data_path, "wb") as f:

        def place(tensor: onnx.TensorProto) -> onnx.TensorProto | None:
            nonlocal moved
            if tensor.data_type == onnx.TensorProto.STRING or external_data_helper.uses_external_data(tensor):
                return None
            if tensor.HasField("raw_data"):
                if len(tensor.raw_data) < _EXTERNAL_THRESHOLD:
                    return None
                data = tensor.raw_data
            else:
                array = numpy_helper.to_array(tensor)
                if array.nbytes < _EXTERNAL_THRESHOLD:
                    return None
                data = numpy_helper.from_array(array).raw_data
            out = onnx.TensorProto()
            _copy_fields(out, tensor, _DATA_FIELDS)
            offset = f.tell()
            f.write(data)
            out.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(data)))):
                entry = out.external_data.add()
                entry.key, entry.value = key, value
            moved += 1
            return out

        for tensor in model.graph.initializer:
            placed = place(tensor)
            skeleton.graph.initializer.append(tensor if placed is None else placed)
        for node in skeleton.graph.node:  # subgraph initializers: the skeleton owns these copies
            for attr in node.attribute:
                subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                for sub in subs:
                    for tensor in _graph_tensors(sub, initializers_only=True):
                        placed = place(tensor)
                        if placed is not None:
                            tensor.CopyFrom(placed)
        f.flush()
        os.fsync(f.fileno())
    return skeleton, moved


def _commit(renames: list[tuple[Path, Path]], scratch: Path) -> None:
    """Rename each written file into place; if a later rename fails, put the earlier targets
    back as they were. SIGINT is held until the renames are done."""
    done: list[tuple[Path, Path | None]] = []  # target, backup of what was there (None: nothing)
    existed = {dst: dst.exists() for _, dst in renames}
    with _interrupts_deferred():
        try:
            for k, (src, dst) in enumerate(renames):
                backup = None
                if k < len(renames) - 1 and dst.exists():
                    backup = scratch / f".previous-{k}-{dst.name}"
                    try:
                        os.link(dst, backup)  # no copy: a second name for the old file
                    except OSError:  # no hard links here: the old file cannot be put back
                        backup = None
                os.replace(src, dst)
                done.append((dst, backup))
        except BaseException:
            for dst, backup in reversed(done):
                try:
                    if backup is not None:
                        os.replace(backup, dst)
                    elif not existed.get(dst, False):
                        dst.unlink()
                except OSError:
                    pass
            raise
    _sync_directory(renames[-1][1].parent)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) for the duration; deliver it afterwards. No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    except ValueError:  # no signal handling here (embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received and callable(previous):
            previous(signal.SIGINT, None)


def _sync_directory(directory: Path) -> None:
    """fsync a directory so a rename in it survives a crash (best effort; not on every OS)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _split(message: Any, number: int) -> tuple[Any, Any]:
    """Two messages of ``message``'s type: its fields numbered below ``number``, and above."""
    head, tail = type(message)(), type(message)()
    for field, value in message.ListFields():
        if field.number != number:
            _set_field(head if field.number < number else tail, field, value)
    return head, tail


#: Field numbers of ``ModelProto.graph`` and ``GraphProto.initializer`` (onnx.proto).
_GRAPH_FIELD, _INITIALIZER_FIELD = 7, 5


@dataclass
class _Layout:
    """A model cut around its initializers: what :func:`_model_pieces` writes, and its size."""

    head: onnx.ModelProto  # the model's fields numbered below ``graph``
    tail: onnx.ModelProto  # and above
    graph_head: onnx.GraphProto  # the graph's fields numbered below ``initializer``
    graph_tail: onnx.GraphProto
    sizes: list[int]  # serialised size of each initializer
    graph_size: int

    @property
    def total(self) -> int:
        return (
            self.head.ByteSize() + 1 + len(_varint(self.graph_size)) + self.graph_size + self.tail.ByteSize()
        )


def _layout(model: onnx.ModelProto) -> _Layout | None:
    """The model cut around its initializers, or ``None`` when the model or its graph holds
    fields this protobuf does not know (cutting would lose them). ``ByteSize`` of a message
    serialises it in upb, so sizes are taken of the pieces, never of the whole model."""
    if not model.HasField("graph") or _has_unknown_fields(model) or _has_unknown_fields(model.graph):
        return None
    head, tail = _split(model, _GRAPH_FIELD)
    g_head, g_tail = _split(model.graph, _INITIALIZER_FIELD)
    sizes = [t.ByteSize() for t in model.graph.initializer]
    g_size = g_head.ByteSize() + g_tail.ByteSize() + sum(1 + len(_varint(n)) + n for n in sizes)
    return _Layout(head, tail, g_head, g_tail, sizes, g_size)


def serialized_size(model: onnx.ModelProto) -> int:
    """``len(model.SerializeToString())``, counted one initializer at a time (no serialised copy
    of the whole model; ``model.ByteSize()`` would make one)."""
    layout = _layout(model)
    return model.ByteSize() if layout is None else layout.total


def _model_pieces(model: onnx.ModelProto) -> Iterator[bytes] | None:
    """``model.SerializeToString()`` as a sequence of pieces, one initializer at a time, so that
    no serialised copy of the whole model is ever held (and upb's encoder does not grow one
    buffer across all the weights). Fields are written in field-number order, as protobuf does,
    so the bytes are the same; ``None`` where :func:`_layout` cannot cut the model: the caller
    serialises it in one piece."""
    layout = _layout(model)
    if layout is None:
        return None
    tag_graph, tag_init = bytes([_GRAPH_FIELD << 3 | 2]), bytes([_INITIALIZER_FIELD << 3 | 2])

    def pieces() -> Iterator[bytes]:
        yield layout.head.SerializeToString()
        yield tag_graph + _varint(layout.graph_size)
        yield layout.graph_head.SerializeToString()
        for tensor, n in zip(model.graph.initializer, layout.sizes):
            yield tag_init + _varint(n)
            yield tensor.SerializeToString()
        yield layout.graph_tail.SerializeToString()
        yield layout.tail.SerializeToString()

    return pieces()


def _has_unknown_fields(message: Any) -> bool:
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet
    except ImportError:  # an older protobuf: assume there may be some
        return True
    return len(UnknownFieldSet(message)) > 0


def _write_model(path: Path, model: onnx.ModelProto) -> None:
    """Write ``model`` serialised to ``path``: streamed where :func:`_model_pieces` can."""
    pieces = _model_pieces(model)
    _write_bytes(path, model.SerializeToString() if pieces is None else pieces)


def _write_bytes(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write ``data`` (bytes, or pieces written in turn) to ``path`` and sync it to disk."""
    with open(path, "wb") as f:
        for piece in [data] if isinstance(data, bytes) else data:
            f.write(piece)
        f.flush()
        os.fsync(f.fileno())


def node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """A node's attributes by name as Python values (strings decoded)."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held in ``node``'s attributes (If branches, Loop and Scan bodies)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs
