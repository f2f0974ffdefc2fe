"""The ONNX path without PyTorch: merge, inspect and verify on ONNX files, fuse_onnx and verify
on ONNX models, in a subprocess whose ``import torch`` fails (tests/no_torch/sitecustomize.py);
a torch API there says in one line that it needs torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
SAMPLES = ROOT / "samples"
HIDE_TORCH = Path(__file__).resolve().parents[2] / "no_torch"

_API = """
import sys
try:
    import torch
except ImportError:
    pass
else:
    raise SystemExit("torch was importable: the blocker did not load")
import onnx
import convfuse
from convfuse.errors import TorchMissingError
fused, report = convfuse.fuse_onnx(sys.argv[1])
assert report.merges, "nothing merged"
result = convfuse.verify(onnx.load(sys.argv[1]), fused)
assert result.passed, result
try:
    convfuse.fuse
except TorchMissingError as exc:
    assert "\\n" not in str(exc) and "needs PyTorch" in str(exc), str(exc)
    print("torch API:", exc)
else:
    raise SystemExit("convfuse.fuse did not say it needs torch")
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules), "torch was imported"
print("ok")
"""


def _env(hide: bool) -> dict[str, str]:
    env = dict(os.environ)
    if hide:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HIDE_TORCH), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(*args: str, hide: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convfuse_cli.main", *args],
        capture_output=True, text=True, env=_env(hide), timeout=300, cwd=ROOT,
    )  # fmt: skip


def test_onnx_commands_run_with_torch_hidden(tmp_path: Path) -> None:
    src = tmp_path / "repvgg.onnx"
    shutil.copy(SAMPLES / "repvgg.onnx", src)
    out = tmp_path / "repvgg.fused.onnx"
    merged = _cli("merge", str(src), "-o", str(out))
    assert merged.returncode == 0, merged.stderr
    assert out.is_file()
    inspected = _cli("inspect", str(src))
    assert inspected.returncode == 0, inspected.stderr
    checked = _cli("verify", str(src), str(out))
    assert checked.returncode == 0, checked.stderr
    assert "Traceback" not in merged.stderr + inspected.stderr + checked.stderr


def test_onnx_api_imports_no_torch_and_torch_api_says_so(tmp_path: Path) -> None:
    src = tmp_path / "convbn.onnx"
    shutil.copy(SAMPLES / "convbn.onnx", src)
    done = subprocess.run(
        [sys.executable, "-c", _API, str(src)], capture_output=True, text=True, env=_env(True), timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok")


def test_blocker_is_what_hides_torch() -> None:
    """Negative twin: without the blocker on the path torch imports (the check above can fail)."""
    code = "import torch, sys; print('torch' in sys.modules)"
    seen = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(False), timeout=300
    )
    assert seen.stdout.strip() == "True"
    hidden = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(True), timeout=300
    )
    assert hidden.returncode != 0 and "hidden by tests/no_torch" in hidden.stderr


def test_import_convfuse_loads_torch_only_for_a_torch_api() -> None:
    """With torch installed: ``import convfuse`` and the CLI import no torch; ``convfuse.fuse`` does."""
    code = (
        "import sys, convfuse, convfuse_cli.main\n"
        "before = 'torch' in sys.modules\n"
        "convfuse.fuse\n"
        "print(before, 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(False), timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
