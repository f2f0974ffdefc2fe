"""The import graph: the core imports no runtime and no front end (ARCHITECTURE.md, "Imports").

Read from the source (``ast``), not by importing, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "convfuse"

#: The core: math, IR, planning, policy, reports. Knows tensors and specs, never a runtime or a graph format.
CORE = {
    "algebra",
    "algebra_linear",
    "border",
    "border_fill",
    "border_map",
    "compare",
    "decline",
    "errors",
    "estimate",
    "ir",
    "maps",
    "planner",
    "policy",
    "provenance",
    "report",
    "report_text",
    "sizes",
    "spec",
    "timing",
    "transpose",
    "_torch",
}
#: What the core must not reach: ONNX Runtime and the modules that own it, and the front ends.
FORBIDDEN = (
    "convfuse.runtime",
    "convfuse.latency",
    "convfuse.verify",
    "convfuse.files",
    "convfuse.frontends",
)
FORBIDDEN_THIRD_PARTY = ("onnxruntime",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """Every module ``path`` (module ``name``) imports, absolute, including imports inside functions
    and under TYPE_CHECKING."""
    name = name or _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module or ""
            target = (f"{base}.{module}" if module else base) if node.level else module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import runtime`
    return found


def violations(path: Path, name: str | None = None) -> list[str]:
    bad = FORBIDDEN + FORBIDDEN_THIRD_PARTY
    return sorted(m for m in imports_of(path, name) if any(m == b or m.startswith(b + ".") for b in bad))


@pytest.mark.parametrize("module", sorted(m for m in CORE if (PACKAGE / f"{m}.py").exists()))
def test_core_imports_no_runtime_and_no_front_end(module: str) -> None:
    assert violations(PACKAGE / f"{module}.py") == []


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """Twin: a core-like module importing the runtime (relative, lazily, or ORT itself) is caught."""
    fake = tmp_path / "probe.py"
    fake.write_text(
        "from . import runtime\n"
        "from .frontends.onnx.io import read_model\n"
        "def f():\n    from .latency import OrtTimer\n    import onnxruntime\n"
    )
    assert violations(fake, "convfuse.probe") == [
        "convfuse.frontends.onnx.io",
        "convfuse.frontends.onnx.io.read_model",
        "convfuse.latency",
        "convfuse.latency.OrtTimer",
        "convfuse.runtime",
        "onnxruntime",
    ]


def test_every_module_is_placed() -> None:
    """A new top-level module must be put in CORE or named here, so the graph stays checked."""
    outside = {"__init__", "files", "latency", "report_html", "runtime", "testing"}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - CORE - outside == set()
