"""Bad input, from the command line and the API: one line naming the file and the cause, exit 2,
a ConvfuseError, no traceback, no output file, and the input left as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import convfuse
from convfuse import files
from convfuse.errors import ConvfuseError, InvalidModelError, InvalidOptionError, OutputError
from convfuse_cli.main import main
from tests.support.onnx_builders import Graph


def _good_model(c: int = 4) -> onnx.ModelProto:
    g = Graph([1, c, 8, 8])
    a = g.bn(g.conv("x", c, c, 3, pads=[1, 1, 1, 1], bias=False), c)
    b = g.bn(g.conv("x", c, c, 1, bias=False), c)
    return g.model([g.node("Relu", [g.node("Add", [a, b])])])


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def _invoke(*args: str):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def _one_error_line(result, prefix: str = "convfuse: error: ") -> str:  # type: ignore[no-untyped-def]
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(prefix), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


# --------------------------------------------------------------------------- unusable input files
def _missing(d: Path) -> Path:
    return d / "missing.onnx"


def _directory(d: Path) -> Path:
    (d / "folder.onnx").mkdir()
    return d / "folder.onnx"


def _empty(d: Path) -> Path:
    (d / "empty.onnx").write_bytes(b"")
    return d / "empty.onnx"


def _random_bytes(d: Path) -> Path:
    (d / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    return d / "random.onnx"


def _truncated(d: Path) -> Path:
    data = _good_model().SerializeToString()
    (d / "truncated.onnx").write_bytes(data[: len(data) // 2])
    return d / "truncated.onnx"


def _text(d: Path) -> Path:
    (d / "notes.onnx").write_text("ir_version: 8\ngraph { name: 'looks like a model, is text' }\n")
    return d / "notes.onnx"


def _tensor_protobuf(d: Path) -> Path:
    """A valid protobuf message, but an ONNX TensorProto, not a model."""
    (d / "tensor.onnx").write_bytes(
        numpy_helper.from_array(np.ones((3, 3), np.float32), "t").SerializeToString()
    )
    return d / "tensor.onnx"


def _graph_only_protobuf(d: Path) -> Path:
    """A protobuf that parses as a ModelProto holding no graph (only a producer name)."""
    (d / "nograph.onnx").write_bytes(b"\x12\x03abc")
    return d / "nograph.onnx"


def _fails_checker(d: Path) -> Path:
    model = _good_model()
    model.graph.node[0].input[0] = "nowhere"
    (d / "broken.onnx").write_bytes(model.SerializeToString())
    return d / "broken.onnx"


def _external_data_missing(d: Path) -> Path:
    onnx.save_model(
        _good_model(8), d / "ext.onnx", save_as_external_data=True, location="ext.onnx.data", size_threshold=0
    )
    (d / "ext.onnx.data").unlink()
    return d / "ext.onnx"


def _external_data_truncated(d: Path) -> Path:
    onnx.save_model(
        _good_model(8),
        d / "short.onnx",
        save_as_external_data=True,
        location="short.onnx.data",
        size_threshold=0,
    )
    data = (d / "short.onnx.data").read_bytes()
    (d / "short.onnx.data").write_bytes(data[: len(data) // 2])
    return d / "short.onnx"


def _external_data_outside(d: Path) -> Path:
    """External data whose location climbs out of the model's directory: refused, not followed."""
    onnx.save_model(
        _good_model(8),
        d / "secret.onnx",
        save_as_external_data=True,
        location="secret.data",
        size_threshold=0,
    )
    model = onnx.load(str(d / "secret.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.data"
    (d / "sub").mkdir()
    (d / "sub" / "outside.onnx").write_bytes(model.SerializeToString())
    return d / "sub" / "outside.onnx"


#: case -> (make the file, words the message must contain)
BAD_FILES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing path": (_missing, "does not exist"),
    "directory": (_directory, "is a directory"),
    "empty file": (_empty, "empty file"),
    "random bytes": (_random_bytes, "corrupt or truncated file"),
    "truncated model": (_truncated, "corrupt or truncated file"),
    "text file": (_text, "text file"),
    "protobuf that is a tensor": (_tensor_protobuf, "not an ONNX model"),
    "protobuf without a graph": (_graph_only_protobuf, "not an ONNX model"),
    "fails the checker": (_fails_checker, "fails the ONNX checker"),
    "external data missing": (_external_data_missing, "does not exist"),
    "external data truncated": (_external_data_truncated, "cannot read external data"),
    "external data outside the directory": (_external_data_outside, "points outside the directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, case: str) -> None:
    make, words = BAD_FILES[case]
    path = make(tmp_path)
    before = _digests(tmp_path)
    commands = [
        ["merge", str(path)],
        ["merge", str(path), "-o", str(tmp_path / "out.onnx")],
        ["inspect", str(path)],
    ]
    for args in commands:
        result = _invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        line = _one_error_line(result, f"convfuse: error: {path}: ")
        assert words in line, line
        assert result.stdout == ""
        assert _digests(tmp_path) == before, args  # no output file, nothing changed
    result = _invoke("verify", str(path), str(path))
    assert result.exit_code == 2
    assert words in _one_error_line(result) and str(path) in result.stderr


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_is_an_invalid_model_error_naming_the_file(tmp_path: Path, case: str) -> None:
    make, words = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(InvalidModelError, match=words) as caught:
        convfuse.fuse_onnx(path)
    assert caught.value.path == str(path) and str(caught.value).startswith(f"{path}: ")
    assert "\n" not in str(caught.value)
    with pytest.raises(ConvfuseError, match=words):
        convfuse.verify(path, path)


def _unprivileged(args: list[str]) -> tuple[int, str]:
    """Exit code and stderr of the command run where file permissions apply: in this process if
    it is not root, else in a forked child that drops to uid/gid ``nobody`` (no new interpreter
    is started, so the child needs no access to the Python installation)."""
    if os.geteuid() != 0:
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        return result.exit_code, result.stderr
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop privileges, run, report through the pipe, never return
        code = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            result = CliRunner().invoke(main, args, catch_exceptions=False)
            os.write(write, f"{result.exit_code}\n{result.stderr}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    exit_code, _, stderr = text.partition("\n")
    return int(exit_code), stderr


@pytest.fixture
def shared_dir():  # type: ignore[no-untyped-def]
    """A directory anyone may enter (pytest's tmp_path is private to its owner)."""
    folder = Path(tempfile.mkdtemp(prefix="convfuse-perm-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_unreadable_file(shared_dir: Path) -> None:
    path = shared_dir / "secret.onnx"
    onnx.save_model(_good_model(), path)
    path.chmod(0)
    code, stderr = _unprivileged(["merge", str(path), "-o", str(shared_dir / "out.onnx")])
    assert code == 2 and stderr == f"convfuse: error: {path}: cannot read (Permission denied)\n"
    assert sorted(p.name for p in shared_dir.iterdir()) == ["secret.onnx"]


def test_api_rejects_what_is_not_a_model_or_a_policy(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="got int"):
        convfuse.fuse_onnx(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidModelError, match="got bytes"):
        convfuse.fuse_onnx(b"\x08\x07")  # type: ignore[arg-type]
    with pytest.raises(InvalidModelError, match="no graph"):
        convfuse.fuse_onnx(onnx.ModelProto())
    with pytest.raises(InvalidOptionError, match="unknown policy 'fastest'"):
        convfuse.fuse_onnx(_good_model(), policy="fastest")
    with pytest.raises(ConvfuseError, match="two ONNX models"):
        convfuse.verify(1, 2)
    with pytest.raises(ConvfuseError, match="device must be one of"):
        convfuse.verify(_good_model(), _good_model(), device="tpu")


def test_torch_api_rejects_non_modules_and_training_mode() -> None:
    import torch.nn as nn

    from convfuse.errors import TrainingModeError

    for value in (42, "model.pt", None):
        with pytest.raises(InvalidModelError, match="expects a torch.nn.Module"):
            convfuse.fuse(value)  # type: ignore[arg-type]
    with pytest.raises(InvalidModelError, match="reads no torch files"):
        convfuse.fuse("model.pt")  # type: ignore[arg-type]
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with pytest.raises(TrainingModeError, match="BatchNorm2d at '1' is in training mode"):
        convfuse.fuse(model)
    fused = convfuse.fuse(model.eval())  # twin: in eval mode it merges
    assert sum(isinstance(m, nn.Conv2d) for m in fused.modules()) == 1


# --------------------------------------------------------------------------- output paths
@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save_model(_good_model(), path)
    return path


@pytest.mark.parametrize(
    "output, words",
    [
        ("missing-dir/out.onnx", "directory"),
        (".", "is a directory"),
        ("model.onnx", "is the input file"),
        ("./sub/../model.onnx", "is the input file"),
        ("link.onnx", "is the input file"),
    ],
)
def test_output_problems_are_one_line_and_change_nothing(model_file: Path, output: str, words: str) -> None:
    folder = model_file.parent
    (folder / "sub").mkdir()
    (folder / "link.onnx").symlink_to(model_file)
    before = _digests(folder)
    target = folder / output
    result = _invoke("merge", str(model_file), "-o", str(target))
    assert result.exit_code == 2, result.output
    assert words in _one_error_line(result, f"convfuse: error: {target}: ")
    assert _digests(folder) == before


def test_output_in_an_unwritable_directory(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root writes anywhere, so the OS refusal is simulated where convfuse meets it: the
    temporary file in the target directory."""
    folder = model_file.parent
    out_dir = folder / "ro"
    out_dir.mkdir()
    before = _digests(folder)

    def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(13, "Permission denied", str(out_dir))

    monkeypatch.setattr("convfuse.frontends.onnx.io.tempfile.mkdtemp", refuse)
    result = _invoke("merge", str(model_file), "-o", str(out_dir / "out.onnx"))
    assert result.exit_code == 2, result.output
    line = _one_error_line(result, f"convfuse: error: {out_dir / 'out.onnx'}: ")
    assert "Permission denied" in line
    assert _digests(folder) == before
    with pytest.raises(OutputError, match="Permission denied") as caught:
        convfuse.frontends.onnx.io.save_model(_good_model(), out_dir / "api.onnx")
    assert caught.value.path == str(out_dir / "api.onnx")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to drop privileges")
def test_output_directory_without_write_permission(shared_dir: Path) -> None:
    src = shared_dir / "model.onnx"
    onnx.save_model(_good_model(), src)
    src.chmod(0o644)
    out_dir = shared_dir / "ro"
    out_dir.mkdir(mode=0o555)
    out_dir.chmod(0o555)
    code, stderr = _unprivileged(["merge", str(src), "-o", str(out_dir / "out.onnx")])
    assert (
        code == 2
        and stderr == f"convfuse: error: {out_dir / 'out.onnx'}: directory {out_dir} is not writable\n"
    )
    assert list(out_dir.iterdir()) == []
    existing = shared_dir / "existing.onnx"  # a read-only file in a writable directory is replaced
    existing.write_bytes(b"old")
    existing.chmod(0o444)
    shared_dir.chmod(0o777)
    code, stderr = _unprivileged(["merge", str(src), "-o", str(existing)])
    assert code == 0, stderr


def test_output_must_not_overwrite_the_inputs_external_data(tmp_path: Path) -> None:
    onnx.save_model(
        _good_model(8),
        tmp_path / "a.onnx",
        save_as_external_data=True,
        location="b.onnx.data",
        size_threshold=0,
    )
    before = _digests(tmp_path)
    for target in ("b.onnx", "b.onnx.data"):  # b.onnx would write b.onnx.data
        result = _invoke("merge", str(tmp_path / "a.onnx"), "-o", str(tmp_path / target))
        assert result.exit_code == 2, result.output
        assert "holds the input's external data" in _one_error_line(result)
        assert _digests(tmp_path) == before
    ok = _invoke("merge", str(tmp_path / "a.onnx"), "-o", str(tmp_path / "c.onnx"))  # twin
    assert ok.exit_code == 0, ok.output
    assert {"c.onnx", "c.onnx.data"} <= {p.name for p in tmp_path.iterdir()}


# --------------------------------------------------------------------------- --in-place
def test_in_place_replaces_the_input_after_verification(model_file: Path) -> None:
    original = onnx.load(str(model_file))
    result = _invoke("merge", str(model_file), "--in-place")
    assert result.exit_code == 0, result.output
    assert f"replaced {model_file}" in result.stdout and "verified: candidate matches" in result.stdout
    assert sorted(p.name for p in model_file.parent.iterdir()) == ["model.onnx"]  # no temporary left
    fused = onnx.load(str(model_file))
    from tests.support.onnx_builders import check_fused, ops

    check_fused(original, fused)
    assert ops(fused) == {"Conv": 1, "Relu": 1}


def test_in_place_with_external_data(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    original = _good_model(8)
    onnx.save_model(_good_model(8), src, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    result = _invoke("merge", str(src), "--in-place")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    from tests.support.onnx_builders import check_fused

    check_fused(original, onnx.load(str(src)))


def test_in_place_is_refused_with_another_output_or_without_verification(model_file: Path) -> None:
    before = _digests(model_file.parent)
    for args in (["-o", str(model_file.parent / "other.onnx")], ["--no-verify"]):
        result = _invoke("merge", str(model_file), "--in-place", *args)
        assert result.exit_code == 2, result.output
        _one_error_line(result)
        assert _digests(model_file.parent) == before
    same = _invoke(
        "merge", str(model_file), "--in-place", "-o", str(model_file)
    )  # -o naming the input is fine
    assert same.exit_code == 0, same.output


def test_in_place_failed_verification_leaves_the_input(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = _digests(model_file.parent)
    real = files.fuse_onnx

    def wrong(model, **kwargs):  # type: ignore[no-untyped-def]
        fused, report = real(model, **kwargs)
        conv = next(n for n in fused.graph.node if n.op_type == "Conv")
        init = next(t for t in fused.graph.initializer if t.name == conv.input[1])
        w = numpy_helper.to_array(init).copy()
        w.flat[0] += 0.1
        init.CopyFrom(numpy_helper.from_array(w, init.name))
        return fused, report

    monkeypatch.setattr(files, "fuse_onnx", wrong)
    result = _invoke("merge", str(model_file), "--in-place")
    assert result.exit_code == 1
    assert "verification failed" in _one_error_line(result)
    assert _digests(model_file.parent) == before


# --------------------------------------------------------------------------- click usage, internal errors
@pytest.mark.parametrize(
    "args, words",
    [
        (["merge", "m.onnx", "--bogus"], "No such option"),
        (["merge", "m.onnx", "--policy", "fastest"], "'fastest' is not one of"),
        (["merge"], "Missing argument 'MODEL.onnx'"),
        (["merge", "a.onnx", "b.onnx"], "unexpected extra argument"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["verify", "a.onnx"], "Missing argument 'CANDIDATE'"),
        (["verify", "a.onnx", "b.onnx", "--samples", "0"], "--samples"),
    ],
)
def test_usage_errors_are_one_line_exit_2(args: list[str], words: str) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    line = _one_error_line(result)
    assert words in line and "--help" in line
    assert result.stdout == ""


def test_help_and_version_still_work() -> None:
    for args in (["--help"], ["merge", "--help"], ["--version"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0 and result.stdout and result.stderr == ""
    bare = CliRunner().invoke(main, [])
    assert bare.exit_code == 2 and "Commands:" in bare.stderr


def test_an_unexpected_exception_is_an_internal_error_not_a_traceback(
    model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("unexpected\nstate")

    monkeypatch.setattr(files, "fuse_onnx", boom)
    before = _digests(model_file.parent)
    result = _invoke("merge", str(model_file))
    assert result.exit_code == 3
    line = _one_error_line(result, "convfuse: internal error: RuntimeError: unexpected state")
    assert "please report" in line
    assert _digests(model_file.parent) == before
    monkeypatch.setenv("CONVFUSE_TRACEBACK", "1")
    verbose = _invoke("merge", str(model_file))
    assert verbose.exit_code == 3 and "Traceback" in verbose.stderr


def test_interrupt_is_exit_130_and_writes_nothing(model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(files, "fuse_onnx", interrupted)
    before = _digests(model_file.parent)
    result = _invoke("merge", str(model_file))
    assert result.exit_code == 130
    assert result.stderr == "convfuse: interrupted; nothing written\n"
    assert _digests(model_file.parent) == before
