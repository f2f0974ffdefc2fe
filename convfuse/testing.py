"""Test helpers: assert in a test suite that a fused model computes what its reference computes."""

from __future__ import annotations

from typing import Any

from .verify import VerifyResult, verify

__all__ = ["assert_equivalent"]


def assert_equivalent(reference: Any, candidate: Any, **options: Any) -> VerifyResult:
    """Run :func:`convfuse.verify` and raise ``AssertionError`` with its text report on a mismatch.

    Takes what ``verify`` takes (two ONNX models or two modules, plus its options) and returns
    the passing :class:`~convfuse.verify.VerifyResult`. Unusable input still raises
    :class:`~convfuse.errors.ConvfuseError`: a broken test setup is not a mismatch.
    """
    __tracebackhide__ = True  # pytest: show the failing test line, not this helper
    result = verify(reference, candidate, **options)
    if not result.passed:
        raise AssertionError("candidate is not equivalent to reference\n" + result.to_text())
    return result
