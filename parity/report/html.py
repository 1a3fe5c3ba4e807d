"""report.html: one self-contained page (no scripts, fonts, stylesheets or images fetched).

Verdict and causes first, then the per-tap error plots (inline SVG drawn here,
no plotting library), the per-run table, the effective configuration of every
implementation, the spec and the tolerances. Every piece of text goes through
`html.escape`.
"""

from __future__ import annotations

import math
from html import escape

from parity.report.render import effective_table, value_text
from parity.gate.verdict import decide, step_errors, used
from parity.model.taps import layer_of, tap_order
from parity.numerics.display import number, share_text
from parity.report.summary import COLUMNS, SEVERITY_TAG, header, run_rows

PASS, FAIL, NOTE = "#1a7f37", "#cf222e", "#9a6700"  # the verdict colours (the test looks for them)
FLOOR = 1e-12  # relative errors below this (exact agreement included) sit on the floor
# line colours: Okabe-Ito-like, colour-blind safe, none equal to PASS or FAIL
PALETTE = ["#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#6a3d9a", "#444444"]
BANDS = {"float64": "#dadaeb", "float32": "#c6dbef", "bfloat16": "#fdd0a2", "float16": "#c7e9c0"}
DASH = {"float64": "1 3", "float32": "", "bfloat16": "7 4", "float16": "2 3"}

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2328;
 margin:0 auto;padding:18px 24px;max-width:1500px}
h1{font-size:20px;margin:0 0 10px} h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d0d7de}
code,.mono{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:12.5px}
.verdict{color:#fff;font-weight:600;font-size:17px;padding:12px 16px;border-radius:6px;margin:0 0 6px}
.pass{background:#1a7f37}.fail{background:#cf222e}.waived{background:#9a6700}
.meta{color:#57606a;margin:4px 0 0}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa} td.num{text-align:right;font-variant-numeric:tabular-nums}
.v-pass{color:#1a7f37;font-weight:700}.v-fail{color:#cf222e;font-weight:700}.v-note{color:#9a6700;font-weight:700}
tr.sev-divergence td:first-child{border-left:5px solid #cf222e}
tr.sev-note td:first-child{border-left:5px solid #9a6700}
td.diff{background:#fff8c5} td.unread{color:#57606a;font-style:italic}
.plots{display:flex;flex-wrap:wrap;gap:18px}
.plot{flex:1 1 600px;max-width:760px} .plot svg{width:100%;height:auto;display:block}
.caption{color:#57606a;font-size:13px;margin:2px 0 10px}
ul.first{margin:4px 0;padding-left:20px} ul.first li{margin:2px 0}
details summary{cursor:pointer;color:#0969da;margin:6px 0}
"""


def to_html(report, *, prompt: str | None = None) -> str:
    """The whole report as one HTML page; `prompt` picks the plotted prompt (default: the longest)."""
    s = report.spec
    v = decide(report)
    title = f"parity {v.status}: {s.name}"
    body = [
        f'<h1>parity report: {_e(s.name)} (Gemma {_e(s.family)}, {_e(s.num_layers)} layers)</h1>',
        f'<div class="verdict {v.status.lower() if v.status != "PASS" else "pass"}" id="verdict">{_e(v.headline)}</div>',
        f'<p class="meta">reference <code>{_e(report.reference)}</code>; weights <code>{_e(report.weights_hash)}'
        f'</code> ({_e(report.weights_source)}); prompts '
        + ", ".join(f"<code>{_e(k)}</code> ({len(v)} tokens)" for k, v in report.prompts.items()) + "</p>",
        _diagnosis_section(report),
        _plots_section(report, prompt),
        _summary_section(report, v),
        _effective_section(report),
        _spec_section(report),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# ---------------------------------------------------------------- sections


def _diagnosis_section(report) -> str:
    out = ["<h2>Diagnosis</h2>"]
    if report.diagnosis:
        out.append("<table><tr><th>run</th><th>cause</th><th>severity</th><th>tap</th><th>evidence</th>"
                   "<th>source</th></tr>")
        for d in report.diagnosis:
            cls = "v-fail" if d.severity == "divergence" else "v-note"
            out.append(
                f'<tr class="sev-{_e(d.severity)}"><td>{_e(d.impl)}@{_e(d.dtype)}</td>'
                f'<td><code class="{cls}">{_e(d.cause)}</code></td><td class="{cls}">{_e(d.severity)}</td>'
                f'<td><code>{_e(d.tap)}</code></td><td>{_e(d.evidence)}</td>'
                f'<td>{_e(d.source)}</td></tr>'
            )
        out.append("</table>")
    else:
        out.append("<p>No cause named: no probe or counterfactual found a formula that differs.</p>")
    firsts = report.first_divergences()
    if firsts:
        out.append("<p>First tap beyond tolerance, per failing run:</p><ul class=\"first\">")
        out += [f"<li class=\"mono\">{_e(f.message())}</li>" for f in firsts]
        out.append("</ul>")
    if report.skipped:
        out.append("<p>Skipped: " + "; ".join(f"<code>{_e(k)}</code>: {_e(v)}" for k, v in report.skipped.items())
                   + "</p>")
    return "\n".join(out)


def _plots_section(report, prompt: str | None) -> str:
    out = ["<h2>Error per tap</h2>"]
    if not report.results:
        return "\n".join(out + ["<p>No taps were compared.</p>"])
    name = prompt if prompt is not None else _longest_prompt(report)
    n = len(report.prompts.get(name, []))
    others = len(report.prompts) - 1
    modes = [m for m in ("cumulative", "isolated") if any(r.mode == m for r in report.results)]
    out.append(
        f'<p class="caption">Prompt <code>{_e(name)}</code> ({n} tokens'
        + (f", the longest of {len(report.prompts)}; the other prompts' taps are in report.json" if others else "")
        + "). y: max |a &minus; ref| / RMS(ref tap) on a log scale (floored at 1e-12); x: every tap in forward "
        "order, ticks at the first tap of each layer. Shaded: the tolerance's atol / RMS per dtype (in "
        "cumulative mode it grows with depth); rtol allows more where |ref| is large, so a tap beyond "
        "tolerance is ringed in red. Hover a point for its tap and numbers.</p>"
    )
    out.append('<div class="plots">')
    for mode in modes:
        out.append(f'<div class="plot">{_mode_plot(report, name, mode)}</div>')
    out.append("</div>")
    steps = step_errors(report)
    if steps:
        out.append("<h2>Error per decode step</h2>")
        out.append(f'<p class="caption">{len(report.continuation)} tokens decoded one at a time after each prompt '
                   "through each implementation's own KV cache. y: the step's worst tap (every tap of every layer, "
                   "the attended keys and the cache contents, over every prompt) as a share of its bound, log "
                   "scale; above 1 it diverges. <i>decode</i>: against the float64 port's full forward; "
                   "<i>decode-self</i>: against the implementation's own full forward in its dtype.</p>")
        out.append(f'<div class="plots"><div class="plot">{_decode_plot(steps)}</div></div>')
    return "\n".join(out)


def _decode_plot(steps: dict) -> str:
    series = []
    for n, ((impl, dtype, mode), used_) in enumerate(steps.items()):
        lab = f"{impl}@{dtype} {mode}"
        pts = [(s, u, f"{lab} step {s}: {share_text(u)} of its bound", u > 1) for s, u in enumerate(used_)]
        series.append({"label": lab, "color": PALETTE[n % len(PALETTE)], "dash": "4 3" if mode != "decode" else "",
                       "points": pts})
    n = max(len(u) for u in steps.values())
    ticks = [(s, str(s)) for s in range(0, n, max(1, math.ceil(n / 12)))]
    return svg_line_plot(series, [{"label": "the bound", "color": "#d0d7de", "points": [(0, 1.0), (n - 1, 1.0)]}],
                         title="decode: each step's worst share of its bound", x_ticks=ticks, x_max=max(n - 1, 1),
                         x_label="decode step", y_label="share of the bound", flag_label="step beyond its bound")


def _summary_section(report, v) -> str:
    head = header()
    names = head[:1] + ("version",) + head[1:]  # the page also says each implementation's version
    out = ["<h2>Runs</h2>", "<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in names) + "</tr>"]
    rows = run_rows(report, v)
    cause_at, status_at = head.index("cause"), head.index("verdict")
    numeric = {i for i, h in enumerate(head) if h not in COLUMNS or h == "taps ok"}
    for row in rows:
        cells = [f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                 for i, c in enumerate(row.cells())]
        cells[cause_at] = "<td>" + (", ".join(
            f'<code class="{"v-fail" if sev == "divergence" else "v-note"}">{_e(c)}</code>'
            + _e(SEVERITY_TAG.get(sev, "")) for c, sev in row.causes) or "-") + "</td>"
        cls = {"PASS": "v-pass", "WAIVED": "v-note", "FAIL": "v-fail"}[row.status]
        cells[status_at] = f'<td class="{cls}">{_e(row.status)}</td>'
        cells.insert(1, f"<td>{_e(row.version)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    partial = [row for row in rows if row.not_compared]
    if partial:
        out.append("<ul class=\"first\">" + "".join(
            f"<li>{_e(row.run)} {_e(row.mode)}: {_e(row.not_compared)}</li>" for row in partial) + "</ul>")
    if v.routing_lines:  # MoE layers whose chosen experts differ from the reference's
        out.append("<p>MoE routing:</p><ul class=\"first\">"
                   + "".join(f"<li>{_e(line)}</li>" for line in v.routing_lines) + "</ul>")
    if v.quant_lines:  # quantized runs: judged against the reference on their own weights, the loss apart
        out.append("<p>Quantized runs (judged against the reference on the weights they hold; the loss apart):</p>"
                   "<ul class=\"first\">" + "".join(f"<li>{_e(line)}</li>" for line in v.quant_lines) + "</ul>")
    return "\n".join(out)


def _effective_section(report) -> str:
    t = effective_table(report)
    if not t.cols:
        return ""
    n = len({k for k, _ in t.differs})
    out = ["<h2>Effective configuration</h2>",
           "<p class=\"caption\">What each built model computes, read back from the model and compared by value "
           f"with the reference <code>{_e(report.reference)}</code>'s: {n or 'no'} propert{'y' if n == 1 else 'ies'} "
           "differ (highlighted); greyed: not read (not a setting of that library, or not reported).</p>",
           "<table><tr><th></th>" + "".join(f"<th>{_e(c)}</th>" for c in t.cols) + "</tr>"]

    def cls(k: str, c: str) -> str:
        return ' class="diff"' if (k, c) in t.differs else ' class="unread"' if (k, c) in t.unread else ""

    for k, cells in t.rows:
        row = "".join(f"<td{cls(k, c)}>{_e(x)}</td>" for c, x in zip(t.cols, cells))
        out.append(f"<tr><th>{_e(k)}</th>{row}</tr>")
    out.append("</table>")
    facts = [c for c in t.cols if t.library[c]]
    if facts:
        out.append("<details><summary>Library-specific facts</summary>")
        for c in facts:
            out.append(f"<p><code>{_e(c)}</code></p><table>" + "".join(
                f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in t.library[c].items()) + "</table>")
        out.append("</details>")
    return "\n".join(out)


def _spec_section(report) -> str:
    spec = report.spec.to_dict()
    out = ["<h2>Spec</h2>", "<table>"]
    for k, v in spec.items():
        out.append(f"<tr><th>{_e(k)}</th><td class=\"mono\">{_e(value_text(v))}</td></tr>")
    out.append("</table>")
    if report.tolerances:
        out += ["<h2>Tolerances</h2>", "<table><tr><th>dtype</th><th>atol (&times; RMS)</th><th>rtol</th>"
                "<th>reason</th></tr>"]
        for k, t in report.tolerances.items():
            out.append(f"<tr><td>{_e(k)}</td><td class=\"num\">{_e(number(t.atol))}</td><td class=\"num\">"
                       f"{_e(number(t.rtol))}</td><td>{_e(t.reason)}</td></tr>")
        out.append("</table>")
    out.append("<details><summary>Prompts (token ids)</summary>")
    out += [f"<p><code>{_e(k)}</code>: <span class=\"mono\">{_e(', '.join(map(str, v)))}</span></p>"
            for k, v in report.prompts.items()]
    out.append("</details>")
    return "\n".join(out)


# ---------------------------------------------------------------- the per-tap plot


def _longest_prompt(report) -> str:
    names = list(report.prompts) or sorted({r.prompt for r in report.results})
    return max(names, key=lambda k: len(report.prompts.get(k, [])))  # max keeps the first of equals


def _mode_plot(report, prompt: str, mode: str) -> str:
    rs = [r for r in report.results if r.prompt == prompt and r.mode == mode]
    if not rs:
        return f"<p>No {_e(mode)} taps for this prompt.</p>"
    order = {t: i for i, t in enumerate(tap_order(report.spec))}
    seen_at = {}
    for r in rs:
        seen_at.setdefault(r.tap, len(seen_at))
    taps = sorted(seen_at, key=lambda t: (order.get(t, len(order)), seen_at[t]))  # forward order; unknown last
    xi = {t: i for i, t in enumerate(taps)}

    labels = []
    for r in rs:
        lab = f"{r.impl}@{r.dtype}"
        if lab not in labels:
            labels.append(lab)
    series = []
    for n, lab in enumerate(labels):
        pts = []
        for r in sorted((r for r in rs if f"{r.impl}@{r.dtype}" == lab), key=lambda r: xi[r.tap]):
            y = r.stat if math.isfinite(r.stat) else _rel(r.max_abs, r.ref_rms)  # in row-RMS units, as the bound
            tip = (f"{lab} {mode} {r.tap}: max_abs {number(r.max_abs)}, needs {number(y)} x row RMS, allowed "
                   f"{number(r.bound)}, {share_text(used(r))} of its bound ({r.basis}), "
                   f"{'pass' if r.passed else 'FAIL'}")
            pts.append((xi[r.tap], y, tip, not r.passed))
        dtype = lab.rsplit("@", 1)[1]
        series.append({"label": lab, "color": PALETTE[n % len(PALETTE)], "dash": DASH.get(dtype, ""), "points": pts})

    bands = []
    for dtype in dict.fromkeys(r.dtype for r in rs):
        tol = {}
        for r in rs:
            if r.dtype == dtype and r.bound > 0:
                tol[r.tap] = max(tol.get(r.tap, 0.0), r.bound)
        if tol:
            pts = sorted((xi[t], v) for t, v in tol.items())
            bands.append({"label": f"{dtype} bound (x row RMS)", "color": BANDS.get(dtype, "#d0d7de"),
                          "points": pts})
    bands.sort(key=lambda b: -max(v for _, v in b["points"]))  # widest first, so narrower ones show on top

    ticks = []
    step = max(1, math.ceil(report.spec.num_layers / 12))  # at most ~12 labelled layers
    seen = set()
    for t in taps:
        layer = layer_of(t)
        if layer is not None and layer not in seen:
            seen.add(layer)
            ticks.append((xi[t], f"L{layer}" if layer % step == 0 else ""))
    ticks = [(0, taps[0])] + [t for t in ticks if t[0] != 0] if taps[0] == "embed" else ticks
    if taps[-1] == "logits":
        ticks.append((xi["logits"], "logits"))
    return svg_line_plot(
        series, bands, title=f"{mode}: error relative to the tap's RMS", x_ticks=ticks, x_max=len(taps) - 1,
        x_label="taps in forward order, embed to logits (Lk: first tap of layer k)", y_label="max |a - ref| / RMS(ref)",
        flag_label="tap beyond tolerance",
    )


def svg_line_plot(series, bands, *, title, x_ticks, x_max, x_label, y_label, flag_label,
                  width=680, plot_height=300) -> str:
    """A log-y line plot as inline SVG.

    series: [{label, color, dash, points: [(x, y, tooltip, flagged)]}]; flagged points get a red ring.
    bands:  [{label, color, points: [(x, y)]}], shaded from the bottom of the axes up to y.
    x_ticks: [(x, label)]; an empty label draws a grid line only.
    """
    ml, mr, mt = 64, 16, 30  # margins: left (y tick labels), right, top (title)
    pw, ph = width - ml - mr, plot_height
    ys = [p[1] for s in series for p in s["points"] if math.isfinite(p[1])]
    ys += [p[1] for b in bands for p in b["points"]]
    lo = math.floor(math.log10(max(min(ys, default=1.0), FLOOR)))
    hi = math.ceil(math.log10(max(max(ys, default=1.0), FLOOR)))
    if hi <= lo:
        hi = lo + 1

    def X(x):
        return ml + (pw * x / x_max if x_max > 0 else pw / 2)

    def Y(y):  # inf (a shape mismatch) sits on the top edge
        ly = hi if not math.isfinite(y) else math.log10(max(y, FLOOR))
        return mt + ph * (hi - min(max(ly, lo), hi)) / (hi - lo)

    legend = [("band", b["label"], b["color"], "") for b in bands]
    legend += [("line", s["label"], s["color"], s["dash"]) for s in series]
    if any(p[3] for s in series for p in s["points"]):
        legend.append(("flag", flag_label, FAIL, ""))
    rows, row, used = [], [], 0
    for item in legend:  # flow legend entries into rows that fit the width
        w = 34 + 6.4 * len(item[1]) + 18
        if row and used + w > width - ml:
            rows.append(row)
            row, used = [], 0
        row.append((item, used))
        used += w
    if row:
        rows.append(row)
    legend_top = mt + ph + 44
    height = legend_top + 18 * len(rows) + 6

    o = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
         f'font-family="system-ui,DejaVu Sans,sans-serif" font-size="11">',
         f'<title>{_e(title)}</title>',
         f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
         f'<text x="{ml}" y="18" font-size="13" font-weight="600">{_e(title)}</text>']
    # bands first (opaque, widest first, so each shows its own colour), then grid, lines and points
    for b in bands:
        top = " ".join(f"{X(x):.1f},{Y(y):.1f}" for x, y in b["points"])
        x0, x1 = X(b["points"][0][0]), X(b["points"][-1][0])
        o.append(f'<polygon points="{x0:.1f},{mt + ph} {top} {x1:.1f},{mt + ph}" fill="{b["color"]}" '
                 f'stroke="none"><title>{_e(b["label"])}</title></polygon>')
        o.append(f'<polyline points="{top}" fill="none" stroke="{_darker(b["color"])}" stroke-width="1"/>')
    # grid and y ticks, one per decade (every other one when the range is wide)
    ystep = 1 if hi - lo <= 12 else 2
    for d in range(lo, hi + 1):
        y = Y(10.0 ** d)
        o.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eaeef2"/>')
        if (d - lo) % ystep == 0:
            o.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end">1e{d}</text>')
    left_of = math.inf  # tick labels right to left: a label that would overlap the one to its right is left out
    for x, lab in sorted(x_ticks, reverse=True):
        px = X(x)
        o.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#d8dee4" '
                 f'stroke-dasharray="2 3"/>')
        o.append(f'<line x1="{px:.1f}" x2="{px:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#57606a"/>')
        half = 3.3 * len(lab) + 3
        if lab and px + half <= left_of:
            o.append(f'<text x="{px:.1f}" y="{mt + ph + 16}" text-anchor="middle">{_e(lab)}</text>')
            left_of = px - half
    for s in series:
        pts = " ".join(f"{X(p[0]):.1f},{Y(p[1]):.1f}" for p in s["points"])
        dash = f' stroke-dasharray="{s["dash"]}"' if s["dash"] else ""
        o.append(f'<polyline points="{pts}" fill="none" stroke="{s["color"]}" stroke-width="2" '
                 f'stroke-linejoin="round"{dash}><title>{_e(s["label"])}</title></polyline>')
    for s in series:
        for x, y, tip, flagged in s["points"]:
            ring = f' stroke="{FAIL}" stroke-width="1.5"' if flagged else ""
            o.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="{3.2 if flagged else 2}" fill="{s["color"]}"'
                     f'{ring}><title>{_e(tip)}</title></circle>')
    # axes and labels
    o.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#57606a"/>')
    o.append(f'<text x="{ml + pw / 2:.1f}" y="{mt + ph + 32}" text-anchor="middle" fill="#57606a">'
             f'{_e(x_label)}</text>')
    o.append(f'<text transform="translate(14 {mt + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
             f'fill="#57606a">{_e(y_label)}</text>')
    for i, r in enumerate(rows):
        y = legend_top + 18 * i
        for (kind, lab, color, dash), dx in r:
            x = ml + dx
            if kind == "band":
                o.append(f'<rect x="{x}" y="{y - 6}" width="26" height="12" fill="{color}" '
                         f'stroke="{_darker(color)}"/>')
            elif kind == "line":
                d = f' stroke-dasharray="{dash}"' if dash else ""
                o.append(f'<line x1="{x}" x2="{x + 26}" y1="{y}" y2="{y}" stroke="{color}" stroke-width="3"{d}/>')
                o.append(f'<rect x="{x + 9}" y="{y - 4}" width="8" height="8" fill="{color}"/>')
            else:
                o.append(f'<circle cx="{x + 13}" cy="{y}" r="4" fill="#ffffff" stroke="{color}" stroke-width="1.5"/>')
            o.append(f'<text x="{x + 32}" y="{y + 4}">{_e(lab)}</text>')
    o.append("</svg>")
    return "\n".join(o)


# ---------------------------------------------------------------- formatting


def _e(x) -> str:
    return escape(str(x), quote=True)


def _rel(max_abs: float, ref_rms: float) -> float:
    if math.isnan(max_abs) or math.isinf(max_abs):
        return math.inf
    if ref_rms <= 0:
        return max(max_abs, FLOOR) if max_abs > 0 else FLOOR
    return max(max_abs / ref_rms, FLOOR)


def _darker(color: str, f: float = 0.7) -> str:
    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return "#" + "".join(f"{int(c * f):02x}" for c in (r, g, b))

