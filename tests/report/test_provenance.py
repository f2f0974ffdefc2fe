"""Merged layers say where they came from: ONNX nodes in ``metadata_props``/``doc_string``, torch
modules in an attribute and their repr; both survive save and load."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import convfuse
from convfuse.frontends.onnx.nodes import label, merged_from
from convfuse.frontends.torch.layers import PROVENANCE_ATTR
from convfuse.provenance import KIND_KEY, SOURCES_KEY, Provenance
from convfuse.report import MergeKind

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.mark.parametrize("sample", ["repvgg", "convbn", "expandnet"])
def test_every_merged_onnx_node_names_the_nodes_it_replaces(sample: str, tmp_path: Path) -> None:
    original = onnx.load(str(SAMPLES / f"{sample}.onnx"))
    fused, report = convfuse.fuse_onnx(original)
    path = tmp_path / "fused.onnx"
    onnx.save_model(fused, path)
    loaded = onnx.load(str(path))
    onnx.checker.check_model(loaded, full_check=True)

    before = {(label(n), n.op_type) for n in original.graph.node}
    after = {(label(n), n.op_type) for n in loaded.graph.node}
    targets = {m.target for m in report.merges}
    merged = [n for n in loaded.graph.node if n.name in targets]
    assert merged, "the sample merges something"
    recorded: set[tuple[str, str]] = set()
    for node in merged:
        p = merged_from(node)
        assert p is not None, node.name
        assert set(p.sources) <= before  # original names and op types
        assert len(p.sources) >= 2 and p.kind is not MergeKind.OTHER
        assert node.doc_string.startswith(f"convfuse: {p.kind.value} merge")
        assert all(name in node.doc_string for name, _ in p.sources)
        recorded |= set(p.sources)
    # Every original node that is gone is accounted for by some merged node.
    assert before - after <= recorded
    # Negative twin: nodes convfuse did not write carry nothing.
    for node in loaded.graph.node:
        if node.name not in targets:
            assert merged_from(node) is None and not any(e.key == KIND_KEY for e in node.metadata_props)


def test_onnx_provenance_is_byte_identical_across_runs() -> None:
    model = onnx.load(str(SAMPLES / "repvgg.onnx"))
    first, _ = convfuse.fuse_onnx(model)
    second, _ = convfuse.fuse_onnx(model)
    assert first.SerializeToString() == second.SerializeToString()


def test_a_sum_of_merged_branches_lists_the_original_layers() -> None:
    """conv+bn merges first, then the sum of those branches: the sum names the Convs and the
    BatchNorms, not the intermediate merged convs twice."""
    fused, _ = convfuse.fuse_onnx(onnx.load(str(SAMPLES / "repvgg.onnx")))
    node = next(n for n in fused.graph.node if n.name == "/features/features.1/dense/dense.0/Conv")
    p = merged_from(node)
    assert p is not None and p.kind is MergeKind.SUM
    assert [op for _, op in p.sources].count("BatchNormalization") == 3
    assert len(set(p.sources)) == len(p.sources)


def test_unreadable_provenance_is_none() -> None:
    assert Provenance.from_properties({SOURCES_KEY: "not json", "convfuse.merge_detail": "sum"}) is None
    assert Provenance.from_properties({}) is None


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.point = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.dense(x)) + self.point(x)


def test_merged_torch_modules_record_their_sources_and_survive_save_and_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), _Block()).eval()
    fused, report = convfuse.fuse_with_report(model)
    marked = {name: m for name, m in fused.named_modules() if hasattr(m, PROVENANCE_ATTR)}
    # One marked module per merge, recording the merge's sources and kind. (Matched by sources:
    # the report names a nested merge by its module path before the Sequential was renumbered.)
    recorded = {
        (p.detail, tuple(n for n, _ in p.sources))
        for p in (getattr(m, PROVENANCE_ATTR) for m in marked.values())
    }
    assert recorded == {(m.kind, m.sources) for m in report.merges} and len(marked) == len(report.merges) == 2
    for module in marked.values():
        assert f"merged {getattr(module, PROVENANCE_ATTR).kind.value} from " in repr(module)
    assert getattr(marked["0"], PROVENANCE_ATTR).sources == (("0", "Conv2d"), ("1", "BatchNorm2d"))
    block = next(getattr(m, PROVENANCE_ATTR) for n, m in marked.items() if n != "0")  # traced by fx
    assert block.kind is MergeKind.SUM
    assert block.sources == (("3.dense", "Conv2d"), ("3.bn", "BatchNorm2d"), ("3.point", "Conv2d"))
    assert not hasattr(fused[1], PROVENANCE_ATTR)  # negative twin: the ReLU was not merged
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for again in (torch.load(buffer, weights_only=False), copy.deepcopy(fused)):
        assert getattr(again[0], PROVENANCE_ATTR) == getattr(fused[0], PROVENANCE_ATTR)
        again_marked = {name: m for name, m in again.named_modules() if hasattr(m, PROVENANCE_ATTR)}
        assert {n: repr(m) for n, m in again_marked.items()} == {n: repr(m) for n, m in marked.items()}
        x = torch.randn(1, 3, 8, 8)
        torch.testing.assert_close(again(x), fused(x))
