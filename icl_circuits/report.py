"""Self-contained HTML reports that open offline: plotly.js and the circuitsvis bundle are embedded.

A report is a list of :class:`Section` (title, HTML body, a short written reading) rendered into one
page by :func:`render_page`; :func:`write_report` writes it atomically. plotly.js is embedded once, in
the page head -- the vendored cartesian bundle (1.5 MB, ``icl_circuits/_vendor/README.md``) when every
trace on the page is one of its types, else the full bundle of the ``plotly`` package (4.8 MB); every
figure is then a ``<div>`` with its own ``<script>``.
circuitsvis views use the bundle's ``local_src`` (inline JS), never the CDN version.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from icl_circuits.io import atomic_write_text


@dataclass(frozen=True)
class Section:
    """One part of a report: a title, an HTML body and an optional plain-text reading (one string, or one
    paragraph per task); ``anchor``: an ``id`` for links within the page (``#anchor``)."""

    title: str
    body: str
    reading: str | Sequence[str] = ""
    anchor: str = ""

    @property
    def paragraphs(self) -> list[str]:
        """The reading as paragraphs (empty ones dropped)."""
        parts = [self.reading] if isinstance(self.reading, str) else list(self.reading)
        return [p for p in parts if p]


#: The trace types of the vendored partial bundle ``plotly.js-cartesian-dist-min`` (its README).
CARTESIAN_TRACES = frozenset({"bar", "box", "contour", "heatmap", "histogram", "histogram2d", "histogram2dcontour",
                              "image", "pie", "scatter", "scatterternary", "violin"})  # fmt: skip
CARTESIAN_JS = Path(__file__).parent / "_vendor" / "plotly-cartesian.min.js"
_NEW_PLOT = re.compile(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*")


@cache
def _cartesian_js() -> str | None:
    """The vendored cartesian bundle, or ``None`` when it is missing or not the installed plotly's version."""
    from plotly.offline import get_plotlyjs_version

    if not CARTESIAN_JS.is_file():
        return None
    text = CARTESIAN_JS.read_text(encoding="utf-8")
    return text if f"plotly.js (cartesian - minified) v{get_plotlyjs_version()}\n" in text[:200] else None


def trace_types(page_html: str) -> set[str]:
    """The trace types of every ``Plotly.newPlot`` call in ``page_html`` (a trace without ``type``: scatter)."""
    out: set[str] = set()
    dec = json.JSONDecoder()
    for m in _NEW_PLOT.finditer(page_html):
        data, _ = dec.raw_decode(page_html, m.end())
        out |= {str(t.get("type", "scatter")) for t in data}
    return out


def plotly_js(traces: Iterable[str] | None = None) -> str:
    """The plotly.js bundle to inline once per page: the vendored cartesian bundle when ``traces`` (the page's
    trace types) are all among :data:`CARTESIAN_TRACES` and it matches the installed plotly's version, else
    the full bundle shipped with the ``plotly`` package (also for ``traces=None``)."""
    from plotly.offline import get_plotlyjs

    small = _cartesian_js() if traces is not None and set(traces) <= CARTESIAN_TRACES else None
    return small if small is not None else get_plotlyjs()


def figure_html(fig: Any) -> str:
    """A plotly figure as a ``<div>`` + ``<script>`` fragment; needs :func:`plotly_js` in the page."""
    return str(fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False}))


def attention_html(
    tokens: Sequence[str], pattern: torch.Tensor, head_names: Sequence[str] | None = None
) -> str:
    """circuitsvis ``attention_heads`` for ``pattern [head, q, k]`` over ``tokens``, inline JS (offline)."""
    import circuitsvis.attention as cva

    pat = pattern.detach().float().cpu()
    if pat.ndim != 3 or pat.shape[1] != len(tokens) or pat.shape[2] != len(tokens):
        raise ValueError(f"pattern must be [head, {len(tokens)}, {len(tokens)}], got {list(pat.shape)}")
    view = cva.attention_heads(attention=pat, tokens=list(tokens), attention_head_names=list(head_names or []) or None)
    return str(view.local_src)


def table_html(df: Any, *, max_rows: int = 40, float_format: str = "{:.3f}") -> str:
    """A pandas DataFrame as an HTML table that scrolls inside its own box: no index column (a named index, or
    an unnamed one that is not integer positions, e.g. labels, becomes a column; the positions left by
    ``sort_values`` do not), the first ``max_rows`` rows, and a note with the true row count when rows were
    left out."""
    import pandas as pd

    named = any(n is not None for n in df.index.names)
    if named or not (isinstance(df.index, pd.RangeIndex) or pd.api.types.is_integer_dtype(df.index)):
        df = df.reset_index()
    table = df.head(max_rows).to_html(
        classes="icl-table", border=0, index=False, float_format=lambda x: float_format.format(x), na_rep="—"
    )
    note = f'<p class="note">The first {max_rows} of {len(df)} rows.</p>' if len(df) > max_rows else ""
    return f'<div class="table-wrap">{table}</div>{note}'



_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1200px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem;
margin-top:2rem}
.reading{background:#f6f8fa;border-left:4px solid #4c78a8;padding:.1rem .9rem;margin:.6rem 0}
table.icl-table{border-collapse:collapse;font-size:.85rem}table.icl-table td,table.icl-table th{padding:.2rem .6rem;
border-bottom:1px solid #eee;text-align:right}
.table-wrap{max-width:100%;max-height:32rem;overflow:auto;border:1px solid #eee}
.note{font-size:.8rem;color:#555;margin:.2rem 0}
details{margin-top:1.5rem;font-size:.8rem;color:#555}pre{white-space:pre-wrap}
"""


def render_page(title: str, sections: Sequence[Section], provenance: dict[str, Any] | None = None) -> str:
    """One self-contained HTML page: plotly.js inlined in the head, no remote scripts."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        f'<script type="text/javascript">{plotly_js(trace_types("".join(s.body for s in sections)))}</script>',
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for s in sections:
        anchor = f' id="{html.escape(s.anchor)}"' if s.anchor else ""
        parts.append(f"<section{anchor}><h2>{html.escape(s.title)}</h2>")
        if s.paragraphs:
            text = "".join(f"<p>{html.escape(p)}</p>" for p in s.paragraphs)
            parts.append(f'<div class="reading">{text}</div>')
        parts.append(s.body)
        parts.append("</section>")
    if provenance is not None:
        parts.append(
            "<details><summary>Provenance</summary><pre>"
            + html.escape(json.dumps(provenance, indent=2, default=str))
            + "</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    path: str | os.PathLike[str], title: str, sections: Sequence[Section], provenance: dict[str, Any] | None = None
) -> Path:
    """Render and write a report atomically (temp file + rename)."""
    return atomic_write_text(path, render_page(title, sections, provenance))
