"""What the fused model keeps, and how it is read and written (external data, atomic, stable)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

import convfuse
from convfuse.errors import InvalidModelError, OutputError
from convfuse.frontends.onnx import io as onnx_io
from convfuse.frontends.onnx.io import read_model, save_model
from tests.support.onnx_builders import Graph, check_fused, ops, run


def _model() -> onnx.ModelProto:
    g = Graph(["N", 3, 8, 8])
    a = g.bn(g.conv("x", 3, 8, 3, pads=[1, 1, 1, 1], bias=False), 8)
    b = g.bn(g.conv("x", 3, 8, 1, bias=False), 8)
    y = g.node("Relu", [g.node("Add", [a, b])])
    z = g.conv(g.conv(y, 8, 32, 1, bias=False), 32, 8, 3, pads=[1, 1, 1, 1])
    model = g.model([z, y])
    model.producer_name, model.producer_version = "unit-test", "9.9"
    model.doc_string, model.graph.doc_string = "model doc", "graph doc"
    model.domain, model.model_version = "org.example", 7
    helper.set_model_props(model, {"author": "tests", "license": "MIT"})
    return onnx.shape_inference.infer_shapes(model)  # value_info for every intermediate tensor


def test_model_fields_and_interface_are_kept() -> None:
    model = _model()
    fused, report = convfuse.fuse_onnx(model)
    check_fused(model, fused)
    for field in ("ir_version", "producer_name", "producer_version", "doc_string", "domain", "model_version"):
        assert getattr(fused, field) == getattr(model, field), field
    assert list(fused.opset_import) == list(model.opset_import)
    assert list(fused.metadata_props) == list(model.metadata_props)
    assert fused.graph.doc_string == model.graph.doc_string and fused.graph.name == model.graph.name
    assert ops(fused) == {"Conv": 2, "Relu": 1}


def test_stale_value_info_is_dropped_and_live_kept() -> None:
    model = _model()
    fused, _ = convfuse.fuse_onnx(model)
    produced = {o for n in fused.graph.node for o in n.output}
    kept = {v.name for v in fused.graph.value_info}
    assert kept <= produced
    before = {v.name: v for v in model.graph.value_info}
    assert kept and all(fused_vi == before[fused_vi.name] for fused_vi in fused.graph.value_info)


def test_merged_node_names_come_from_the_originals() -> None:
    model = _model()
    fused, report = convfuse.fuse_onnx(model)
    originals = {n.name for n in model.graph.node}
    assert all(n.name in originals for n in fused.graph.node)
    assert all(m.target in originals for m in report.merges)


def test_same_input_gives_identical_bytes_across_processes(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save_model(_model(), src)
    code = (
        "import sys, convfuse; from convfuse.frontends.onnx.io import save_model;"
        "m, _ = convfuse.fuse_onnx(sys.argv[1]); save_model(m, sys.argv[2])"
    )
    digests = set()
    for k, seed in enumerate(["0", "12345"]):
        out = tmp_path / f"out{k}.onnx"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run([sys.executable, "-c", code, str(src), str(out)], check=True, env=env)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_external_data_is_read_and_written(tmp_path: Path) -> None:
    model = _model()
    src = tmp_path / "ext.onnx"
    onnx.save_model(_model(), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    src_hashes = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    loaded = read_model(src)
    assert loaded.external_data
    fused, _ = convfuse.fuse_onnx(src)
    out = tmp_path / "sub" / "fused.onnx"
    out.parent.mkdir()
    save_model(fused, out, external_data=True)
    assert (out.parent / "fused.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]
    reread = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in reread.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    check_fused(model, onnx.load(str(out)))
    assert {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir() if p.is_file()
    } == src_hashes


def test_save_is_atomic_and_leaves_no_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fused, _ = convfuse.fuse_onnx(_model())
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")

    def broken(path: Path, data: bytes) -> None:
        data = data if isinstance(data, bytes) else b"".join(data)  # a model is written in pieces
        Path(path).write_bytes(data[:10])
        raise OSError("disk full")

    monkeypatch.setattr(onnx_io, "_write_bytes", broken)
    with pytest.raises(OutputError, match="disk full"):
        save_model(fused, out)
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    monkeypatch.undo()
    save_model(fused, out)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    np.testing.assert_array_equal(run(onnx.load(str(out)))[0], run(fused)[0])


def test_unwritable_targets_are_output_errors(tmp_path: Path) -> None:
    fused, _ = convfuse.fuse_onnx(_model())
    with pytest.raises(OutputError, match="does not exist"):
        save_model(fused, tmp_path / "missing" / "out.onnx")
    with pytest.raises(OutputError, match="is a directory"):
        save_model(fused, tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"", "empty file"), (b"\x08\x07garbage\xff\xfe" * 10, "not an ONNX model")],
)
def test_bad_files_are_invalid_model_errors(tmp_path: Path, content: bytes | None, message: str) -> None:
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InvalidModelError, match=message):
        convfuse.fuse_onnx(path)


def test_directory_and_checker_failures_are_invalid_model_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="directory"):
        convfuse.fuse_onnx(tmp_path)
    broken = _model()
    broken.graph.node[0].input[0] = "nowhere"
    with pytest.raises(InvalidModelError, match="checker"):
        convfuse.fuse_onnx(broken)


# --------------------------------------------------------------------------- streamed write
def _rich_model() -> onnx.ModelProto:
    """A model with fields on both sides of ``graph`` and of ``initializer``."""
    model = _model()
    model.doc_string = "doc"
    model.domain = "test.domain"
    model.model_version = 3
    helper.set_model_props(model, {"author": "convfuse", "purpose": "streamed write"})
    model.graph.doc_string = "graph doc"
    model.graph.value_info.append(helper.make_tensor_value_info("unused_info", onnx.TensorProto.FLOAT, [1]))
    return model


def test_streamed_write_is_byte_for_byte_serialize(tmp_path: Path) -> None:
    """The model is written one initializer at a time, and the file is SerializeToString's bytes."""
    model = _rich_model()
    assert onnx_io._model_pieces(model) is not None  # the streamed path is the one taken
    out = tmp_path / "m.onnx"
    save_model(model, out)
    assert out.read_bytes() == model.SerializeToString()
    assert onnx.load(str(out)) == model


def test_unknown_fields_are_written_whole_and_kept(tmp_path: Path) -> None:
    """Negative twin: a field this protobuf does not know (number 99) rules the stream out, and
    the file still carries it."""
    model = onnx.ModelProto()
    model.ParseFromString(_rich_model().SerializeToString() + b"\x98\x06\x01")  # field 99, varint 1
    assert onnx_io._model_pieces(model) is None
    out = tmp_path / "m.onnx"
    save_model(model, out)
    assert out.read_bytes() == model.SerializeToString()
    assert out.read_bytes().endswith(b"\x98\x06\x01")


def test_serialized_size_counts_without_serialising() -> None:
    """The report's model size, counted piece by piece, is the serialised length (unknown fields
    included, where the whole model is measured)."""
    model = _rich_model()
    assert onnx_io.serialized_size(model) == len(model.SerializeToString())
    odd = onnx.ModelProto()
    odd.ParseFromString(model.SerializeToString() + b"\x98\x06\x01")
    assert onnx_io.serialized_size(odd) == len(odd.SerializeToString()) == len(model.SerializeToString()) + 3
