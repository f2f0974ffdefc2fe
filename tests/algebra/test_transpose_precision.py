"""The transposed-conv precision script runs and reports every rule at float64 rounding."""

from __future__ import annotations

import re

import pytest

from benchmarks import transpose_precision


def test_precision_script_reports_every_rule(capsys: pytest.CaptureFixture[str]) -> None:
    transpose_precision.main(4)
    out = capsys.readouterr().out
    rows = re.findall(r"^  (\S.*?)\s+(\d\.\d\de[-+]\d\d)\s+\((\d+) cases\)$", out, flags=re.M)
    rules = {rule.split(" (")[0] for rule, _, _ in rows}
    assert rules >= {
        "transpose_then_affine",
        "transpose_then_pointwise",
        "pointwise_then_transpose",
        "affine_then_transpose",
        "add_transposed",
    }, out
    assert all(float(err) < 1e-12 for _, err, _ in rows), out
