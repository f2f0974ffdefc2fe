"""Nothing lost: the input is never modified, a failed write leaves no partial file and no changed
file, and the same input gives the same bytes in every process."""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import convfuse
from convfuse import files
from convfuse.errors import OutputError
from convfuse.frontends.onnx import io as onnx_io
from convfuse.frontends.onnx.io import save_model, stage_model
from convfuse_cli.main import main
from tests.support.onnx_builders import Graph, check_fused


def _model(c: int = 8) -> onnx.ModelProto:
    g = Graph([1, c, 8, 8])
    a = g.bn(g.conv("x", c, c, 3, pads=[1, 1, 1, 1], bias=False), c)
    b = g.bn(g.conv("x", c, c, 1, bias=False), c)
    y = g.node("Relu", [g.node("Add", [a, b])])
    return g.model([g.conv(g.conv(y, c, 4 * c, 1), 4 * c, c, 3, pads=[1, 1, 1, 1])])


def _digests(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _perturbed(model: onnx.ModelProto) -> onnx.ModelProto:
    wrong = onnx.ModelProto()
    wrong.CopyFrom(model)
    init = wrong.graph.initializer[0]
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return wrong


# --------------------------------------------------------------------------- the input is never modified
@pytest.mark.parametrize("external", [False, True])
def test_input_unchanged_by_merge_inspect_and_verify(
    tmp_path: Path, external: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "in" / "m.onnx"
    src.parent.mkdir()
    onnx.save_model(_model(), src, save_as_external_data=external, location="m.onnx.data", size_threshold=0)
    inputs = _digests(src.parent)
    out = tmp_path / "out.onnx"
    assert _invoke("merge", str(src), "-o", str(out)).exit_code == 0  # success
    assert _invoke("inspect", str(src)).exit_code == 0
    assert _invoke("verify", str(src), str(out)).exit_code == 0
    wrong = tmp_path / "wrong.onnx"
    onnx.save_model(_perturbed(onnx.load(str(out))), wrong)
    wrong_digest = _digests(tmp_path)["wrong.onnx"]
    assert _invoke("verify", str(src), str(wrong)).exit_code == 1  # verify failure
    assert _digests(tmp_path)["wrong.onnx"] == wrong_digest
    assert (
        _invoke("merge", str(src), "-o", str(tmp_path / "nodir" / "x.onnx")).exit_code == 2
    )  # merge failure
    real = files.fuse_onnx
    monkeypatch.setattr(files, "fuse_onnx", lambda m, **kw: (lambda f, r: (_perturbed(f), r))(*real(m, **kw)))
    assert _invoke("merge", str(src), "-o", str(tmp_path / "bad.onnx")).exit_code == 1  # verification failure
    assert not (tmp_path / "bad.onnx").exists()
    assert _digests(src.parent) == inputs


# --------------------------------------------------------------------------- failed writes
@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("external", [False, True])
def test_failure_mid_write_leaves_no_partial_and_no_changed_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException, external: bool
) -> None:
    fused, _ = convfuse.fuse_onnx(_model())
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous model")
    (tmp_path / "out.onnx.data").write_bytes(b"previous data")
    before = _digests(tmp_path)
    real_write = onnx_io._write_bytes

    def broken(path: Path, data: bytes) -> None:
        data = data if isinstance(data, bytes) else b"".join(data)  # a model is written in pieces
        real_write(path, data[: len(data) // 2])  # half written, then the disk fills / Ctrl-C
        raise failure

    monkeypatch.setattr(onnx_io, "_write_bytes", broken)
    expected = OutputError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        save_model(fused, out, external_data=external)
    assert _digests(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]  # no temporary left


def test_failure_while_writing_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, _ = convfuse.fuse_onnx(_model())
    out = tmp_path / "out.onnx"
    save_model(_model(), out, external_data=True)  # an existing output with its data file
    before = _digests(tmp_path)
    real_fsync = os.fsync
    calls = []

    def full_disk(fd: int) -> None:
        calls.append(fd)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_io.os, "fsync", full_disk)  # the data file is synced first
    with pytest.raises(OutputError, match="No space left on device") as caught:
        save_model(fused, out, external_data=True)
    monkeypatch.setattr(onnx_io.os, "fsync", real_fsync)
    assert calls and caught.value.path == str(out)
    assert _digests(tmp_path) == before


def test_a_failed_second_rename_puts_the_first_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Model and data are two renames: if the model's fails, the old data file is restored."""
    fused, _ = convfuse.fuse_onnx(_model())
    out = tmp_path / "out.onnx"
    save_model(_model(), out, external_data=True)
    before = _digests(tmp_path)
    real_replace = os.replace

    def fail_on_model(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(onnx_io.os, "replace", fail_on_model)
    with pytest.raises(OutputError, match="Input/output error"):
        save_model(fused, out, external_data=True)
    monkeypatch.setattr(onnx_io.os, "replace", real_replace)
    assert _digests(tmp_path) == before
    check_fused(_model(), onnx.load(str(out)), tol=0)  # still the old, consistent pair


def test_ctrl_c_during_the_renames_waits_for_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, _ = convfuse.fuse_onnx(_model())
    out = tmp_path / "out.onnx"
    real_replace = os.replace
    sent = []

    def replace_and_interrupt(src, dst):  # type: ignore[no-untyped-def]
        if not sent:
            sent.append(dst)
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the data and the model rename
        real_replace(src, dst)

    monkeypatch.setattr(onnx_io.os, "replace", replace_and_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_model(fused, out, external_data=True)
    assert sent == [tmp_path / "out.onnx.data"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "out.onnx.data"]
    check_fused(_model(), onnx.load(str(out)))  # both renames happened: a consistent pair


def test_command_line_disk_full_is_one_line_and_keeps_the_old_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "m.onnx"
    onnx.save_model(_model(), src)
    out = tmp_path / "m.fused.onnx"
    out.write_bytes(b"previous")
    before = _digests(tmp_path)

    def full(path: Path, data: bytes) -> None:
        data = data if isinstance(data, bytes) else b"".join(data)  # a model is written in pieces
        Path(path).write_bytes(data[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx_io, "_write_bytes", full)
    result = _invoke("merge", str(src))
    assert result.exit_code == 2
    assert result.stderr == f"convfuse: error: {out}: cannot write (No space left on device)\n"
    assert _digests(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.fused.onnx",
        "m.onnx",
    ]


def test_staged_model_is_loadable_before_commit_and_gone_if_not_committed(tmp_path: Path) -> None:
    fused, _ = convfuse.fuse_onnx(_model())
    out = tmp_path / "out.onnx"
    with stage_model(fused, out, external_data=True) as staged:
        assert staged.path.parent.parent == tmp_path and not out.exists()
        onnx.checker.check_model(str(staged.path), full_check=True)
        check_fused(_model(), onnx.load(str(staged.path)))
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- same input, same bytes
def test_same_bytes_in_two_processes_with_external_data(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save_model(_model(16), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    command = [sys.executable, "-m", "convfuse_cli.main", "merge", str(src)]
    outputs = []
    for k, seed in enumerate(["1", "999"]):
        out = tmp_path / f"run{k}" / "fused.onnx"
        out.parent.mkdir()
        env = dict(os.environ, PYTHONHASHSEED=seed)
        done = subprocess.run(
            [*command, "-o", str(out)], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr
        outputs.append({p.name: p.read_bytes() for p in out.parent.iterdir()})
    assert sorted(outputs[0]) == ["fused.onnx", "fused.onnx.data"]
    assert outputs[0] == outputs[1]
    model = onnx.load(str(tmp_path / "run0" / "fused.onnx"))
    check_fused(_model(16), model)
    assert np.all([t.data_type == onnx.TensorProto.FLOAT for t in model.graph.initializer])
