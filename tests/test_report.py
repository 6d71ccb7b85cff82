"""The shared HTML report: one self-contained page, escaped text, no remote scripts (icl_circuits.report)."""

from __future__ import annotations

import re

import pandas as pd
import pytest

from icl_circuits.report import Section, render_page, table_html, write_report
from tests.helpers import REMOTE_SCRIPT

pytestmark = pytest.mark.unit


def test_page_has_sections_readings_and_provenance_escaped(tmp_path):
    sections = [Section("A <b>", "<p id='body-a'>x</p>", reading="rises & falls"), Section("B", "<p>y</p>")]
    page = render_page("Title <i>", sections, provenance={"seed": 3, "spec": "<model>"})
    assert page.startswith("<!DOCTYPE html>") and "<title>Title &lt;i&gt;</title>" in page
    assert "<h2>A &lt;b&gt;</h2>" in page and "<p id='body-a'>x</p>" in page  # bodies are HTML, titles text
    assert page.count('class="reading"') == 1 and "rises &amp; falls" in page
    assert "Provenance" in page and "&lt;model&gt;" in page and "&quot;seed&quot;: 3" in page
    assert page.index("<h2>A") < page.index("<h2>B") and not REMOTE_SCRIPT.search(page)
    assert len(re.findall(r"<script", page)) == 1  # plotly.js inlined once, in the head
    path = write_report(tmp_path / "r.html", "T", sections)
    assert path.read_text() == render_page("T", sections) and "Provenance" not in path.read_text()


def test_table_shows_the_first_rows_formatted():
    df = pd.DataFrame({"x": [0.12345, 2.0, 3.0], "name": ["a", "b", None]})
    html = table_html(df, max_rows=2)
    assert "0.123" in html and "2.000" in html and "3.000" not in html and 'class="dataframe icl-table"' in html


def test_table_has_no_pandas_index_column():
    """Row positions (also after sort_values) are not shown; a named index or a label index is a column."""
    df = pd.DataFrame({"layer": [0, 1, 2], "score": [0.1, 0.9, 0.5]}).sort_values("score", ascending=False)
    html = table_html(df)
    assert "<th>index</th>" not in html and "<th>layer</th>" in html
    assert "<th>task</th>" in table_html(df.set_index("layer").rename_axis("task"))
    labelled = table_html(pd.DataFrame({"v": [1.0, 2.0]}, index=["L0H1", "L1H0"]))
    assert "L0H1" in labelled and "<th>index</th>" in labelled
    assert html.startswith('<div class="table-wrap">')  # wide tables scroll inside their box, not the page


def test_page_inlines_the_cartesian_bundle_only_when_it_covers_every_trace(monkeypatch):
    """Heatmap, scatter, bar and box pages get the vendored 1.5 MB bundle; another trace type, or a plotly whose
    plotly.js version differs from the vendored file's, gets the full bundle of the plotly package."""
    import plotly.graph_objects as go
    import plotly.offline
    from plotly.offline import get_plotlyjs

    from icl_circuits import report
    from icl_circuits.report import CARTESIAN_JS, figure_html, trace_types

    figs = [go.Figure(go.Heatmap(z=[[1]])), go.Figure([go.Scatter(y=[1]), go.Bar(y=[1]), go.Box(y=[1])])]
    small = render_page("t", [Section("s", "".join(figure_html(f) for f in figs))])
    assert trace_types(small) == {"heatmap", "scatter", "bar", "box"}
    assert CARTESIAN_JS.read_text(encoding="utf-8") in small and get_plotlyjs() not in small
    other = render_page("t", [Section("s", figure_html(go.Figure(go.Scatter3d(x=[1], y=[1], z=[1]))))])
    assert get_plotlyjs() in other
    report._cartesian_js.cache_clear()
    monkeypatch.setattr(plotly.offline, "get_plotlyjs_version", lambda: "0.0.0")
    try:
        assert get_plotlyjs() in render_page("t", [Section("s", figure_html(figs[0]))])
    finally:
        report._cartesian_js.cache_clear()
