"""A verification result as one self-contained HTML page, with a picture of where it failed.

The page holds the verdict, the per-output error table, the attribution (which merged node is
wrong on its own, on the border or in the interior) and, for each failing image-shaped tensor,
its error map (:attr:`convfuse.verify.OutputCheck.error_map`: max |error| per position over
channels and batch) as an inline PNG with the border ring outlined. No scripts, no network,
no external assets: numpy, zlib and struct write the PNG.

Colours: black is no error, grey up to the tolerance, red from the tolerance up (full red at
1000 times the tolerance, log scale); a cyan line is the inner edge of the border ring
(``border_width`` wide when the verifier located the errors on the border, else 1).
"""

from __future__ import annotations

import base64
import html
import math
import os
import struct
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import InvalidOptionError, OutputError

if TYPE_CHECKING:
    from .verify import OutputCheck, VerifyResult

__all__ = ["RING", "error_image", "png", "html_page", "write_page"]

#: Colour of the line marking the inner edge of the border ring.
RING = (0, 255, 255)

#: Smallest side of an error map in pixels (cells are scaled up by a whole factor).
_MIN_SIDE = 192
_MAX_SCALE = 32


def png(rgb: np.ndarray) -> bytes:
    """An ``[H, W, 3]`` uint8 array as PNG bytes (8-bit RGB, no filtering)."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise InvalidOptionError(f"png needs an [H, W, 3] uint8 array, got {rgb.dtype} {rgb.shape}")
    h, w, _ = rgb.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    pixels = zlib.compress(rows.tobytes(), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def error_image(error: np.ndarray, tolerance: float, ring: int = 1) -> tuple[np.ndarray, int]:
    """An ``[H, W]`` error map as RGB pixels (see the module docstring) and the scale factor
    (pixels per position); the inner edge of a ``ring``-wide border is drawn in :data:`RING`."""
    err = np.asarray(error, dtype=np.float64)
    finite = np.isfinite(err)
    largest = float(err[finite].max()) if finite.any() else 0.0
    tol = tolerance if tolerance > 0 else (largest if largest > 0 else 1.0)
    ratio = np.where(finite, err / tol, np.inf)
    rgb = np.zeros((*err.shape, 3), np.float64)
    within = ratio <= 1
    rgb[within] = (ratio[within] * 110)[:, None]  # black to grey
    over = np.minimum(np.log10(np.maximum(ratio[~within], 1.0)) / 3, 1.0)  # 1x .. 1000x tolerance
    rgb[~within] = np.stack([140 + 115 * over, 40 * (1 - over), 40 * (1 - over)], axis=-1)
    h, w = err.shape
    scale = int(min(_MAX_SCALE, max(1, math.ceil(_MIN_SIDE / max(1, min(h, w))))))
    image = np.repeat(np.repeat(rgb.round().astype(np.uint8), scale, axis=0), scale, axis=1)
    if 0 < ring and 2 * ring < min(h, w):
        t = max(1, scale // 6)  # line thickness, inside the interior's first cells
        top, bottom, left, right = ring * scale, (h - ring) * scale, ring * scale, (w - ring) * scale
        image[top : top + t, left:right] = RING
        image[bottom - t : bottom, left:right] = RING
        image[top:bottom, left : left + t] = RING
        image[top:bottom, right - t : right] = RING
    return image, scale


def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _num(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.3e}"


def _checks_table(checks: Sequence[OutputCheck]) -> str:
    names = ("output", "device", "dtype", "shape", "verdict", "max abs err", "max rel err", "tolerance")
    head = "".join(f"<th>{h}</th>" for h in names)
    rows = []
    for c in checks:
        cls = "ok" if c.passed else "bad"
        shape = "x".join(str(d) for d in c.shape) or "scalar"
        errors = (_num(c.max_abs_error), _num(c.max_rel_error), _num(c.tolerance))
        cells = (c.name, c.device, c.dtype, shape, c.verdict(), *errors)
        rows.append(f'<tr class="{cls}">' + "".join(f"<td>{_e(v)}</td>" for v in cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _figure(title: str, check: OutputCheck) -> str:
    """The error map of ``check`` as an inline PNG, or a line saying why there is none."""
    emap = check.error_map
    if emap is None or emap.ndim != 2:
        why = "it passed" if check.passed else "it is not a 2-D image-shaped tensor"
        return f'<p class="note">No error map for {_e(title)}: {why}.</p>'
    ring = check.border_width or 1
    image, scale = error_image(emap, check.tolerance, ring)
    data = base64.b64encode(png(image)).decode("ascii")
    where = check.where() or "errors everywhere"
    h, w = emap.shape
    return (
        f'<figure><img alt="error map of {_e(title)}" width="{w * scale}" height="{h * scale}" '
        f'src="data:image/png;base64,{data}">'
        f"<figcaption>{_e(title)}: max |error| per position ({h}x{w}) over channels and batch; {_e(where)}; "
        f"cyan: inner edge of the border ring (width {ring})</figcaption></figure>"
    )


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;background:#fff;max-width:70em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
.verdict{font-size:1.2em;font-weight:bold;padding:.5em 1em;display:inline-block}
.pass{background:#dfd;color:#060}.fail{background:#fdd;color:#900}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left}
tr.bad td{background:#fee}tr.ok td{background:#f4fff4}
figure{display:inline-block;margin:1em 1em 1em 0}img{image-rendering:pixelated;border:1px solid #888}
figcaption{max-width:32em;font-size:.85em}pre{background:#f6f6f6;padding:1em;overflow-x:auto}
.note{color:#555}
"""


def html_page(result: VerifyResult, *, title: str = "convfuse verify", report_text: str = "") -> str:
    """The page for ``result`` (see the module docstring); ``report_text`` (a merge report) is
    shown as it would print."""
    verdict = "PASS" if result.passed else "FAIL"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}: {verdict}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="verdict {"pass" if result.passed else "fail"}">{verdict}</p>',
        f"<p>{_e(result.summary())}</p>",
        f"<p>reference <code>{_e(result.reference)}</code>, candidate <code>{_e(result.candidate)}</code>; "
        f"seed {result.seed}; inputs "
        + _e(", ".join(f"{i.name} {i.dtype} {'x'.join(map(str, i.shape))}" for i in result.inputs) or "-")
        + "</p>",
        "<h2>Outputs</h2>",
        _checks_table(result.checks),
        "<h2>Attribution</h2>",
    ]
    if result.suspects:
        items = []
        for s in result.suspects:
            where = s.check.where() or "everywhere"
            items.append(
                f"<li><b>{_e(', '.join(s.candidate_nodes) or 'no node')}</b> is wrong on its own "
                f"(tensor <code>{_e(s.check.name)}</code>, sample {s.sample}, max rel err "
                f"{_num(s.check.max_rel_error)}): {_e(where)}; it replaced "
                f"{_e(', '.join(s.reference_nodes) or 'no node')}.</li>"
            )
        parts.append(f"<ul>{''.join(items)}</ul>")
    elif result.passed:
        parts.append('<p class="note">Nothing to attribute: every output matches.</p>')
    else:
        parts.append('<p class="note">No single region is wrong on its own (see the notes).</p>')
    failing = [c for c in result.checks if not c.passed]
    if failing or result.suspects:
        parts.append("<h2>Error maps</h2>")
        parts += [_figure(f"output {c.name} ({c.device})", c) for c in failing]
        parts += [_figure(f"tensor {s.check.name} (region alone)", s.check) for s in result.suspects]
        parts.append(
            '<p class="note">Black: no error; grey: within tolerance; red: above it (full red at 1000x, '
            "log scale).</p>"
        )
    if result.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in result.notes) + "</ul>")
    if report_text:
        parts.append(f"<h2>Merge report</h2><pre>{_e(report_text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_page(path: str | os.PathLike[str], page: str) -> Path:
    """Write ``page`` to ``path`` atomically (a temporary file beside it, then renamed)."""
    target = Path(path)
    parent = target.parent if str(target.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as an ordinary new file, not mkstemp's 0600
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(page)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OutputError(f"cannot write the HTML page: {e.strerror or e}", path=target) from None
    return target
