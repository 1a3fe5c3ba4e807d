"""report.html (parity.report.html.to_html): its content, and what headless Chromium draws of it.

Reports come from the real harness on tiny-gemma: a passing one (the port and HF,
float32 and bfloat16, both modes) and a failing one (the port with gate and up
swapped, which diverges at layers.0.mlp.act).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest

from parity.report.html import BANDS, FAIL, PALETTE, PASS, to_html
from parity.report.render import headline

PROMPT = {"p": [2, 17, 301, 5, 88, 260, 9, 140]}
CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1400, 2000


@pytest.fixture(scope="module")
def good():
    from parity.harness import Request, run
    from parity.model.presets import PRESETS

    return run(Request(spec=PRESETS["tiny-gemma"], impls=["litgpt-style", "hf"], dtypes=["float32", "bfloat16"],
                       mode="both", prompts=PROMPT))


@pytest.fixture(scope="module")
def bad():
    from parity.harness import Request, run
    from parity.model.presets import PRESETS
    from tests.variants import swapped_geglu

    return run(Request(spec=PRESETS["tiny-gemma"], impls=["swapped-geglu"], adapters={"swapped-geglu": swapped_geglu()},
                       dtypes=["float32", "bfloat16"], mode="both", prompts=PROMPT))


def _external_refs(page: str) -> list[str]:
    """Anything the page would fetch: src/href to a URL, stylesheets, scripts, CSS url() or @import."""
    refs = re.findall(r"""\b(?:src|href|xlink:href)\s*=\s*["']?\s*((?:https?:)?//[^"'\s>]*)""", page, re.I)
    refs += re.findall(r"<(?:script|link|img|iframe|object|embed)\b[^>]*>", page, re.I)
    refs += re.findall(r"url\s*\(|@import", page, re.I)
    return refs


def test_passing_report_leads_with_the_verdict(good):
    page = to_html(good)
    assert good.passed
    verdict = re.search(r'<div class="verdict (\w+)" id="verdict">(.*?)</div>', page)
    assert verdict and verdict.group(1) == "pass" and verdict.group(2).startswith("PASS: 8 run(s) agree")
    assert page.index('id="verdict"') < page.index("<svg")  # the verdict comes before the plots
    assert page.count("<svg") == 2  # cumulative and isolated, one prompt
    assert re.search(r'<div class="plots">\s*<div class="plot"><svg.*?cumulative.*?</svg></div>\s*'
                     r'<div class="plot"><svg.*?isolated.*?</svg></div>', page, re.S)
    for label in ("litgpt-style@float32", "litgpt-style@bfloat16", "hf@float32", "hf@bfloat16",
                  "float32 bound", "bfloat16 bound"):
        assert page.count(f">{label}") >= 2, label  # a legend entry in each plot
    assert ">tap beyond tolerance</text>" not in page  # no ring in the legend: nothing to ring
    assert page.count('class="v-pass">PASS</td>') == 8  # one row per run
    assert "<h2>Effective configuration</h2>" in page and "hf@bfloat16</th>" in page
    assert "<h2>Spec</h2>" in page and "tiny-gemma" in page
    assert _external_refs(page) == []


def test_failing_report_names_the_cause_and_the_tap(bad):
    page = to_html(bad)
    assert not bad.passed
    assert re.fullmatch(r"FAIL: swapped-geglu@float32 diverges at layers\.0\.mlp\.act \(cumulative, \S+x of its bound\): "
                        r"cause geglu-swapped", headline(bad)), headline(bad)
    verdict = re.search(r'<div class="verdict (\w+)" id="verdict">(.*?)</div>', page)
    assert verdict and verdict.group(1) == "fail" and verdict.group(2) == headline(bad)
    diagnosis = page[page.index("<h2>Diagnosis</h2>"):page.index("<h2>Error per tap</h2>")]
    assert diagnosis.count('<tr class="sev-divergence">') == 2  # float32 and bfloat16
    assert '<code class="v-fail">geglu-swapped</code>' in diagnosis
    assert "GELU is gelu applied to mlp.up" in diagnosis  # the probe's evidence
    assert "layers.0.mlp.act [p]: 2048 / 2048 elements" in diagnosis  # the first divergence, torch.testing-shaped
    assert page.count("<svg") == 2
    assert page.count(f'stroke="{FAIL}" stroke-width="1.5"><title>') > 10  # failing taps are ringed
    assert re.search(r"<title>swapped-geglu@float32 cumulative layers\.0\.mlp\.act: [^<]*FAIL</title>", page)
    assert '<td class="diff">gelu(up) * gate</td>' in page  # the effective GeGLU differs from the reference's
    assert _external_refs(page) == []


def test_all_text_is_escaped(bad):
    evil = "<script>alert('x')</script> & <b>"
    report = dataclasses.replace(bad, diagnosis=[dataclasses.replace(d, evidence=evil, cause="<i>c</i>") for d in bad.diagnosis],
                                 skipped={"<img src=x>": evil})
    page = to_html(report)
    assert "<script" not in page and "<img" not in page and "<i>c</i>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;" in page
    assert page.count("&lt;i&gt;c&lt;/i&gt;") >= 3  # the headline, the diagnosis table, the runs table


def test_one_plot_per_mode_that_ran_and_the_longest_prompt_is_named(good):
    cumulative = dataclasses.replace(good, results=[r for r in good.results if r.mode == "cumulative"],
                                     runs=[r for r in good.runs if r.mode == "cumulative"])
    page = to_html(cumulative)
    assert page.count("<svg") == 1 and "isolated:" not in page
    two = dataclasses.replace(good, prompts={"short": [2, 17], **good.prompts})
    page = to_html(two)
    assert "Prompt <code>p</code> (8 tokens, the longest of 2;" in page


# ---------------------------------------------------------------- rendering in Chromium


def read_png(path) -> np.ndarray:
    """An 8-bit RGB or RGBA, non-interlaced PNG as a (height, width, channels) uint8 array.

    Filters 0-4 are undone along anti-diagonals: pixel (r, c) needs (r, c-1), (r-1, c) and
    (r-1, c-1) only, so a whole anti-diagonal is one numpy step.
    """
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    w, h, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    ch = 3 if color == 2 else 4
    rows = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * ch)
    kinds, filtered = rows[:, 0], rows[:, 1:].reshape(h, w, ch).astype(np.int16)
    assert kinds.max() <= 4, "unknown PNG filter"
    x = np.zeros((h + 1, w + 1, ch), np.int16)  # a zero row above and a zero column to the left
    for k in range(h + w - 1):
        r = np.arange(max(0, k - w + 1), min(h - 1, k) + 1)
        c = k - r
        a, b, cc = x[r + 1, c], x[r, c + 1], x[r, c]
        t = kinds[r][:, None]  # one filter per row, for each of its channels
        p = a + b - cc
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - cc)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, cc))
        pred = np.select([t == 0, t == 1, t == 2, t == 3], [0, a, b, (a + b) // 2], paeth)
        x[r + 1, c + 1] = (filtered[r, c] + pred) & 0xFF
    return x[1:, 1:].astype(np.uint8)


def _write_png(path, img: np.ndarray) -> None:
    """Encode with every filter type in turn (row i uses filter i % 5), for testing read_png."""
    h, w, ch = img.shape
    x = np.zeros((h + 1, w + 1, ch), np.int16)
    x[1:, 1:] = img
    raw = b""
    for i in range(h):
        t = i % 5
        row, a, b, c = x[i + 1, 1:], x[i + 1, :-1], x[i, 1:], x[i, :-1]
        p = a + b - c
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        pred = [np.zeros_like(row), a, b, (a + b) // 2, paeth][t]
        raw += bytes([t]) + ((row - pred) & 0xFF).astype(np.uint8).tobytes()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6 if ch == 4 else 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [3, 4])
def test_png_reader_undoes_every_filter(tmp_path, channels):
    img = np.random.default_rng(0).integers(0, 256, size=(23, 17, channels), dtype=np.uint8)
    _write_png(tmp_path / "t.png", img)
    assert np.array_equal(read_png(tmp_path / "t.png"), img)


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)])


def _histogram(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct colours of an image, (n, 3), and how many pixels have each."""
    p = img[..., :3].astype(np.int32)
    packed, counts = np.unique((p[..., 0] << 16) | (p[..., 1] << 8) | p[..., 2], return_counts=True)
    return np.stack([packed >> 16, (packed >> 8) & 255, packed & 255], axis=-1), counts


def _count(hist, color: str, within: int = 0) -> int:
    """Pixels within `within` per channel of a colour (antialiased edges blend, so lines need a margin)."""
    colors, counts = hist
    return int(counts[np.abs(colors - _rgb(color)).max(axis=-1) <= within].sum())


def screenshot(page: str, tmp_path: Path) -> np.ndarray:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium): the rendering is not checked")
    html = tmp_path / "report.html"
    html.write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           f"--window-size={WIDTH},{HEIGHT}", html.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0 and shot.exists(), f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    keep = os.environ.get("PARITY_KEEP_SCREENSHOTS")  # a directory to copy the screenshots to, for a look
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / f"{'pass' if 'verdict pass' in page else 'fail'}.png")
    return read_png(shot)


@pytest.mark.parametrize("which", ["good", "bad"])
def test_chromium_draws_the_verdict_and_the_plots(which, request, tmp_path):
    report = request.getfixturevalue(which)
    img = screenshot(to_html(report), tmp_path)
    assert img.shape[:2] == (HEIGHT, WIDTH)
    page, top = _histogram(img), _histogram(img[:200])
    assert len(page[1]) > 200, f"a blank or near-blank page: {len(page[1])} colours"
    verdict, other = (PASS, FAIL) if report.passed else (FAIL, PASS)
    banner = _count(top, verdict)  # the verdict bar is at the top, in its colour
    assert banner > 30_000, f"{banner} pixels of the verdict colour {verdict} at the top"
    assert _count(top, other) == 0
    # both tolerance bands, each a large area of its own colour
    for dtype in ("float32", "bfloat16"):
        assert _count(page, BANDS[dtype]) > 40_000, f"the {dtype} tolerance band is not drawn"
    # the plotted lines: each implementation@dtype has its own colour, well beyond its legend swatches
    # (where two implementations agree, the later line covers the earlier one: at least two must show)
    labels = list(dict.fromkeys(f"{r.impl}@{r.dtype}" for r in report.results))
    drawn = [_count(page, PALETTE[i], within=8) for i in range(len(labels))]
    assert sum(n > 600 for n in drawn) >= 2, f"line colours {dict(zip(labels, drawn))}"
    if not report.passed:  # failing taps ringed in the plots, FAIL in the table
        rings = _count(page, FAIL, within=8) - _count(top, FAIL, within=8)
        assert rings > 500, rings
