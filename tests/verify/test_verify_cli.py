"""``convfuse verify``: exit 0 match, 1 mismatch, 2 bad input or absent device, one line, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result

from convfuse.runtime import cuda_in_ort
from convfuse_cli.main import main
from tests.support import verify_models as vm


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(main, ["verify", *map(str, args)])


def _save(tmp_path: Path, name: str, model: onnx.ModelProto) -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _assert_error(result: Result, *fragments: str) -> None:
    """Exit 2 with exactly one line on stderr naming the cause, nothing on stdout, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("convfuse: error: "), result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)  # no escaped exception
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def chain_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Reference padded chain, an identical copy, and the naive (border-wrong) merge."""
    return (
        _save(tmp_path, "ref.onnx", vm.padded_chain()),
        _save(tmp_path, "same.onnx", vm.padded_chain()),
        _save(tmp_path, "naive.onnx", vm.naive_merge()),
    )


def test_match_exits_0(chain_files) -> None:
    ref, same, _ = chain_files
    result = _run(ref, same)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("PASS: ") and result.stderr == ""


def test_mismatch_exits_1_and_names_the_border_and_the_merge(chain_files) -> None:
    ref, _, naive = chain_files
    result = _run(ref, naive)
    assert result.exit_code == 1, result.output
    assert result.stdout.startswith("FAIL: ")
    assert "on the border only (ring width 1" in result.stdout
    assert "wrong on its own (sample 0): tensor 'y' from candidate Conv 'merged'" in result.stdout
    assert "wrong on its own" not in _run(ref, naive, "--no-attribution").stdout


def test_json_parses(chain_files) -> None:
    ref, same, naive = chain_files
    ok = _run(ref, same, "--json", "--samples", "3", "--seed", "9")
    assert ok.exit_code == 0
    data = json.loads(ok.stdout)
    assert data["passed"] is True and data["samples"] == 3 and data["seed"] == 9
    assert data["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 3, 16, 16]}]
    bad = _run(ref, naive, "--json")
    assert bad.exit_code == 1
    out = json.loads(bad.stdout)["outputs"][0]
    assert out["passed"] is False and out["location"] == "border" and out["rtol"] == 1e-5


def test_tolerance_options(chain_files, tmp_path: Path) -> None:
    ref = _save(tmp_path, "unpadded.onnx", vm.unpadded_chain())
    params = vm.perturbed(vm.chain_params(), "conv2.w", 1e-3)
    cand = _save(tmp_path, "off.onnx", vm.unpadded_chain(params))
    assert _run(ref, cand).exit_code == 1
    assert _run(ref, cand, "--rtol", "1e-2").exit_code == 0
    assert _run(ref, cand, "--rtol", "0", "--atol", "1.0").exit_code == 0
    assert _run(ref, cand, "--rtol", "-1").exit_code == 2  # click range check


def test_symbolic_shapes(tmp_path: Path) -> None:
    dims = ["N", 3, "H", "W"]
    ref = _save(tmp_path, "ref.onnx", vm.padded_chain(dims=dims))
    naive = _save(tmp_path, "naive.onnx", vm.naive_merge(dims=dims))
    default = _run(ref, ref)
    assert default.exit_code == 0
    assert (
        "note: input 'x' has symbolic dims at axes 0 (N), 2 (H), 3 (W): ran at 2x3x1x1 and 2x3x4x4"
        in default.stdout
    )
    shaped = _run(ref, naive, "--shape", "x=2x3x10x10", "--json")
    assert shaped.exit_code == 1
    data = json.loads(shaped.stdout)
    assert data["inputs"][0]["shape"] == [2, 3, 10, 10] and data["outputs"][0]["location"] == "border"
    _assert_error(_run(ref, ref, "--shape", "x=1x3"), "does not fit")
    _assert_error(_run(ref, ref, "--shape", "y=1x3x4x4"), "not a model input")
    _assert_error(_run(ref, ref, "--shape", "x1x3"), "NAME=DIMS")


def test_inputs_file(tmp_path: Path) -> None:
    ref = _save(tmp_path, "ref.onnx", vm.multi_io())
    shifted = _save(tmp_path, "shifted.onnx", vm.multi_io(shift=1e-3))
    rng = np.random.default_rng(1)
    arrays = {
        "x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32),
        "s": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
        "k": rng.integers(0, 9, (1, 4, 8, 8)),
        "m": rng.random((1, 4, 8, 8)) < 0.3,
    }
    good = tmp_path / "in.npz"
    np.savez(good, **arrays)
    assert _run(ref, ref, "--inputs", good).exit_code == 0
    assert _run(ref, shifted, "--inputs", good).exit_code == 1
    missing_key = tmp_path / "missing.npz"
    np.savez(missing_key, **{k: v for k, v in arrays.items() if k != "k"})
    _assert_error(_run(ref, ref, "--inputs", missing_key), "missing k")
    _assert_error(_run(ref, ref, "--inputs", tmp_path / "nope.npz"), "nope.npz", "does not exist")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"\x00\x01 not a zip" * 50)
    _assert_error(_run(ref, ref, "--inputs", garbage), "garbage.npz", "is not an .npz archive")
    single = tmp_path / "single.npy"
    np.save(single, arrays["x"])
    _assert_error(_run(ref, ref, "--inputs", single), "single.npy", "is not an .npz archive")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(good.read_bytes()[:200])
    _assert_error(_run(ref, ref, "--inputs", broken), "broken.npz")


def test_missing_model_file(chain_files, tmp_path: Path) -> None:
    ref, _, _ = chain_files
    _assert_error(_run(ref, tmp_path / "missing.onnx"), "candidate", "missing.onnx", "does not exist")
    _assert_error(_run(tmp_path / "missing.onnx", ref), "reference", "does not exist")
    _assert_error(_run(tmp_path, ref), "reference", "is a directory")


def test_garbage_model_file(chain_files, tmp_path: Path) -> None:
    ref, _, _ = chain_files
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    _assert_error(_run(ref, garbage), "garbage.onnx", "not an ONNX model")
    text = tmp_path / "text.onnx"
    text.write_text("ir_version: 8\nthis is not a model\n")
    _assert_error(_run(text, ref), "text.onnx")
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    _assert_error(_run(ref, empty), "empty.onnx")


def test_different_output_names_exit_2(chain_files, tmp_path: Path) -> None:
    ref, _, _ = chain_files
    other = vm.padded_chain()
    other.graph.node[-1].output[0] = "out"
    other.graph.output[0].name = "out"
    _assert_error(_run(ref, _save(tmp_path, "other.onnx", other)), "same output names")


def test_cuda_without_cuda_exits_2_with_a_clear_line(chain_files) -> None:
    if cuda_in_ort():
        pytest.skip("this machine has CUDA for onnxruntime")
    ref, same, _ = chain_files
    _assert_error(_run(ref, same, "--device", "cuda"), "CUDA was requested", "CUDAExecutionProvider")
    everything = _run(ref, same, "--device", "all")
    assert everything.exit_code == 0 and "note: cuda not checked" in everything.stdout
