"""The HTML page of a failed check: it parses, it is self-contained, its error map marks the
border ring (decoded back from the PNG here), and it renders in headless Chromium.

Chromium comes from Debian's packages (``apt-get install -y chromium``); where it is absent the
rendering test skips and says so.
"""

from __future__ import annotations

import base64
import html.parser
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from convfuse.report_html import RING, error_image, png
from convfuse.verify import verify_onnx
from convfuse_cli.main import main
from tests.cli.test_cli_merge import _model_file, break_merges
from tests.support import verify_models as vm

_VOID = {"meta", "img", "br", "hr", "link", "input", "col", "source", "wbr"}


class _Page(html.parser.HTMLParser):
    """Collects tags and image sources, and checks that every element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs).get("src") or "")
        if tag not in _VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    return page


def decode_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB or RGBA PNG (any row filters, not interlaced) as an ``[H, W, 3]`` array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and colour in (2, 6) and interlace == 0, (depth, colour, interlace)
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = w * bpp
    out = np.zeros((h, stride), np.int32)
    prev = np.zeros(stride, np.int32)
    for y in range(h):
        kind, row = raw[y * (stride + 1)], np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(
            np.int32
        )
        cur = row.copy()
        if kind == 1 or kind == 3 or kind == 4:
            for x in range(stride):
                left = cur[x - bpp] if x >= bpp else 0
                up, corner = prev[x], (prev[x - bpp] if x >= bpp else 0)
                if kind == 1:
                    pred = left
                elif kind == 3:
                    pred = (left + up) // 2
                else:
                    p = left + up - corner
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                    pred = left if pa <= pb and pa <= pc else up if pb <= pc else corner
                cur[x] = (row[x] + pred) & 0xFF
        elif kind == 2:
            cur = (row + prev) & 0xFF
        else:
            assert kind == 0, kind
        out[y], prev = cur, cur
    return out.reshape(h, w, bpp)[:, :, :3].astype(np.uint8)


def _verify_page(
    tmp_path: Path, candidate: onnx.ModelProto, reference: onnx.ModelProto | None = None
) -> tuple[int, str, str]:
    ref, cand, page = tmp_path / "ref.onnx", tmp_path / "cand.onnx", tmp_path / "page.html"
    onnx.save_model(vm.padded_chain() if reference is None else reference, ref)
    onnx.save_model(candidate, cand)
    result = CliRunner().invoke(
        main, ["verify", str(ref), str(cand), "--html", str(page)], catch_exceptions=False
    )
    return result.exit_code, result.stdout, page.read_text(encoding="utf-8")


def test_the_verifier_exposes_the_error_map() -> None:
    result = verify_onnx(vm.padded_chain(), vm.naive_merge())
    (check,) = result.checks
    emap = check.error_map
    assert emap is not None and emap.shape == (vm.SIZE, vm.SIZE) and check.border_width == 1
    ring = np.ones(emap.shape, bool)
    ring[1:-1, 1:-1] = False
    assert emap[ring].min() > check.tolerance >= emap[~ring].max()
    # Twin: a right merge has no map (nothing failed).
    right = verify_onnx(vm.unpadded_chain(), vm.exact_merge())
    assert right.passed and right.checks[0].error_map is None


def test_the_page_of_a_border_wrong_merge_parses_and_marks_the_ring(tmp_path: Path) -> None:
    code, stdout, text = _verify_page(tmp_path, vm.naive_merge())
    assert code == 1 and f"wrote {tmp_path / 'page.html'}" in stdout
    page = _parse(text)
    words = " ".join(" ".join(page.text).split())
    assert "FAIL" in words and "on the border only (ring width 1" in words
    assert "Conv 'merged' is wrong on its own" in words and "it replaced Conv 'conv1', Conv 'conv2'" in words
    # Self-contained: no scripts, no links, every image inline.
    assert "script" not in page.tags and "link" not in page.tags
    assert not re.search(r"(src|href)=\"(?!data:)", text) and "http" not in text.replace("http-equiv", "")
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)

    image = decode_png(base64.b64decode(page.images[0].split(",", 1)[1]))
    n = vm.SIZE
    scale = image.shape[0] // n
    assert image.shape == (n * scale, n * scale, 3) and scale > 1
    cells = image[scale // 2 :: scale, scale // 2 :: scale].astype(int)  # one pixel per position
    red = (cells[..., 0] > 120) & (cells[..., 1] < 80) & (cells[..., 2] < 80)
    ring = np.ones((n, n), bool)
    ring[1:-1, 1:-1] = False
    assert red[ring].all() and not red[~ring].any()  # wrong on the ring, right inside
    edge = image[scale, scale : (n - 1) * scale]  # the first interior pixel row: the marker
    assert (edge == RING).all()
    assert (image[scale : (n - 1) * scale, scale] == RING).all()
    assert not (image[0] == RING).all(axis=-1).any()  # the ring itself keeps its colour


def test_the_page_of_a_right_merge_says_pass_and_has_no_map(tmp_path: Path) -> None:
    code, _, text = _verify_page(tmp_path, vm.exact_merge(), vm.unpadded_chain())
    page = _parse(text)
    assert code == 0 and "PASS" in " ".join(page.text) and not page.images


def test_png_round_trips() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    assert (decode_png(png(rgb)) == rgb).all()
    image, scale = error_image(np.zeros((4, 4)), 1.0, ring=1)
    assert image.shape == (4 * scale, 4 * scale, 3) and (image[0, 0] == 0).all()


def test_merge_writes_the_page_only_when_the_check_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = _model_file(tmp_path)
    page = tmp_path / "failed.html"
    ok = CliRunner().invoke(main, ["merge", str(src), "--html", str(page), "-o", str(tmp_path / "ok.onnx")])
    assert ok.exit_code == 0 and not page.exists()  # twin: a passing merge writes no page
    break_merges(monkeypatch)
    result = CliRunner().invoke(main, ["merge", str(src), "--html", str(page)], catch_exceptions=False)
    assert result.exit_code == 1 and f"error page: {page}" in result.stdout
    assert not (tmp_path / "model.fused.onnx").exists()
    parsed = _parse(page.read_text(encoding="utf-8"))
    words = " ".join(" ".join(parsed.text).split())
    assert "FAIL" in words and "Merge report" in words and "merged sum of branches 1" in words


def _chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium here (Debian: apt-get install -y chromium); rendering not checked",
)
def test_the_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    _, _, text = _verify_page(tmp_path, vm.naive_merge())
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            str(_chromium()),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=900,1000",
            f"--screenshot={shot}",
            (tmp_path / "page.html").as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert shot.exists(), "chromium wrote no screenshot"
    image = decode_png(shot.read_bytes()).astype(int)
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50  # text, table, pictures: not blank
    red = (image[..., 0] > 200) & (image[..., 1] < 60) & (image[..., 2] < 60)
    cyan = (image[..., 0] < 60) & (image[..., 1] > 200) & (image[..., 2] > 200)
    assert red.sum() > 1000 and cyan.sum() > 100  # the error map itself was drawn


def test_an_unwritable_page_is_one_line_and_exit_2(tmp_path: Path) -> None:
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    onnx.save_model(vm.padded_chain(), ref)
    onnx.save_model(vm.naive_merge(), cand)
    page = tmp_path / "missing" / "page.html"
    result = CliRunner().invoke(
        main, ["verify", str(ref), str(cand), "--html", str(page)], catch_exceptions=False
    )
    assert result.exit_code == 2 and not page.exists()
    assert result.stderr.count("\n") == 1 and "cannot write the HTML page" in result.stderr
