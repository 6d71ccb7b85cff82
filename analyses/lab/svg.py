"""Small self-contained SVG charts for the README figures (no plotting dependency: plotly's static export needs
kaleido, which is not installed). Each chart is a ``<g>`` of ``width x height``; :func:`page` stacks them."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from icl_circuits.results import series_colors

W, H = 520, 300
PAD_L, PAD_R, PAD_T, PAD_B = 52, 130, 30, 40


def _axes(title: str, xlabel: str, ylabel: str, ymin: float, ymax: float) -> list[str]:
    out = [f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
           'fill="none" stroke="#999"/>',
           f'<text x="{(W - PAD_R + PAD_L) / 2}" y="{H - 6}" text-anchor="middle" font-size="11">'
           f'{escape(xlabel)}</text>',
           f'<text x="12" y="{(H - PAD_B + PAD_T) / 2}" text-anchor="middle" font-size="11" '
           f'transform="rotate(-90 12 {(H - PAD_B + PAD_T) / 2})">{escape(ylabel)}</text>']  # fmt: skip
    for i in range(5):
        v = ymin + (ymax - ymin) * i / 4
        y = _y(v, ymin, ymax)
        out.append(f'<line x1="{PAD_L - 4}" x2="{PAD_L}" y1="{y:.1f}" y2="{y:.1f}" stroke="#999"/><text '
                   f'x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{v:.2g}</text>')  # fmt: skip
    return out


def _y(v: float, ymin: float, ymax: float) -> float:
    return H - PAD_B - (v - ymin) / (ymax - ymin) * (H - PAD_T - PAD_B)


def _legend(names: Sequence[str], colors: dict[str, str]) -> list[str]:
    x = W - PAD_R + 8
    return [f'<rect x="{x}" y="{PAD_T + 16 * i}" width="10" height="10" fill="{colors[n]}"/>'
            f'<text x="{x + 14}" y="{PAD_T + 16 * i + 9}" font-size="10">{escape(n)}</text>'
            for i, n in enumerate(names)]  # fmt: skip


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], *, title: str, xlabel: str,
               ylabel: str, ymin: float, ymax: float, vlines: Sequence[tuple[float, str]] = (),
               hlines: Sequence[float] = ()) -> str:  # fmt: skip
    """Lines ``name -> (xs, ys)`` on a linear x axis spanning every series; dashed ``vlines`` labelled."""
    xs_all = [x for xs, _ in series.values() for x in xs]
    xmin, xmax = min(xs_all), max(xs_all)
    xmax = xmax if xmax > xmin else xmin + 1

    def px(x: float) -> float:
        return PAD_L + (x - xmin) / (xmax - xmin) * (W - PAD_L - PAD_R)

    colors = series_colors(list(series))
    out = _axes(title, xlabel, ylabel, ymin, ymax)
    for i in range(5):
        x = xmin + (xmax - xmin) * i / 4
        out.append(f'<text x="{px(x):.1f}" y="{H - PAD_B + 14}" text-anchor="middle" font-size="10">{x:.4g}</text>')
    for v in hlines:
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{_y(v, ymin, ymax):.1f}" y2="{_y(v, ymin, ymax):.1f}" '
                   'stroke="#bbb" stroke-dasharray="2 3"/>')  # fmt: skip
    for j, (x, label) in enumerate(vlines):
        out.append(f'<line x1="{px(x):.1f}" x2="{px(x):.1f}" y1="{PAD_T}" y2="{H - PAD_B}" stroke="#555" '
                   f'stroke-dasharray="5 3"/><text x="{px(x) + 3:.1f}" y="{PAD_T + 12 + 12 * j}" font-size="10">'
                   f'{escape(label)}</text>')  # fmt: skip
    for name, (xs, ys) in series.items():
        pts = " ".join(f"{px(x):.1f},{_y(min(max(y, ymin), ymax), ymin, ymax):.1f}" for x, y in zip(xs, ys))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{colors[name]}" stroke-width="1.8"/>')
        out += [f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2" fill="{colors[name]}"/>'
                for p in pts.split()]
    return "\n".join(out + _legend(list(series), colors))


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float]], *, title: str, xlabel: str, ylabel: str,
              ymin: float = 0.0, ymax: float = 1.0, hlines: Sequence[float] = ()) -> str:  # fmt: skip
    """Grouped bars: one group per ``groups`` entry, one bar per series in it."""
    colors = series_colors(list(series))
    out = _axes(title, xlabel, ylabel, ymin, ymax)
    gw = (W - PAD_L - PAD_R) / len(groups)
    bw = gw * 0.8 / len(series)
    for g, name in enumerate(groups):
        x0 = PAD_L + g * gw
        out.append(f'<text x="{x0 + gw / 2:.1f}" y="{H - PAD_B + 14}" text-anchor="middle" font-size="9">'
                   f'{escape(name)}</text>')  # fmt: skip
        for k, (s, vals) in enumerate(series.items()):
            v = min(max(vals[g], ymin), ymax)
            y = _y(v, ymin, ymax)
            out.append(f'<rect x="{x0 + gw * 0.1 + k * bw:.1f}" y="{y:.1f}" width="{bw * 0.9:.1f}" '
                       f'height="{H - PAD_B - y:.1f}" fill="{colors[s]}"/>')  # fmt: skip
    for v in hlines:
        out.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{_y(v, ymin, ymax):.1f}" y2="{_y(v, ymin, ymax):.1f}" '
                   'stroke="#333" stroke-dasharray="2 3"/>')  # fmt: skip
    return "\n".join(out + _legend(list(series), colors))


def page(charts: Sequence[str], columns: int = 2) -> str:
    """The charts in a grid, as one standalone SVG document."""
    rows = (len(charts) + columns - 1) // columns
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * min(columns, len(charts))}" height="{H * rows}" '
             'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>']  # fmt: skip
    for i, c in enumerate(charts):
        parts.append(f'<g transform="translate({W * (i % columns)} {H * (i // columns)})">\n{c}\n</g>')
    return "\n".join([*parts, "</svg>\n"])
