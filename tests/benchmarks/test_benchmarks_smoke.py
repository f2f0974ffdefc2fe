"""Smoke test of the benchmark harness: the ``--quick`` path on the tiniest model, one repetition.

Goes through the same adapters as ``python -m benchmarks.run``, so it fails (not skips) when a
convfuse front end is missing. Peer tools are used only when importable (not installed in CI).
"""

from __future__ import annotations

import importlib.util

from benchmarks import run
from benchmarks.results import MAX_REL_ERR

_PEERS = all(importlib.util.find_spec(p) is not None for p in ("onnxsim", "onnxoptimizer"))


def test_quick_run_on_tiniest_model() -> None:
    argv = ["--quick", "--models", "expandnet-s", "--reps", "1", "--pass-reps", "1", "--threads", "1"]
    res = run.run(run.parse_args(argv + ([] if _PEERS else ["--no-peers"])))
    assert res.failures == []
    (m,) = res.models
    assert set(m.ort[1]) >= {"original", "ort", "convfuse", "convfuse+ort"}
    assert set(m.ort[1]) >= ({"onnxsim", "onnxoptimizer"} if _PEERS else set())
    # convfuse's output computes the same function and collapses the ExpandNet chains.
    assert max(m.rel_err.values()) < MAX_REL_ERR
    assert m.eager_rel_err is not None and m.eager_rel_err < MAX_REL_ERR
    assert m.counts["convfuse"]["BatchNormalization"] == 0
    assert m.counts["convfuse"]["Conv"] < m.counts["original"]["Conv"]
    assert m.macs["convfuse"] < m.macs["original"]
    for heading in (
        "## ONNX Runtime latency",
        "## Graph",
        "## torch eager",
        "## Merge pass cost",
        "## Targets",
    ):
        assert heading in res.markdown
