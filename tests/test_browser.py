"""Every kind of HTML report opens in headless Chromium offline, renders its plots and views, logs no JS errors.

Screenshots land in ``out/screenshots/`` for inspection. Chromium comes from Debian's ``chromium``
package (``.ci/run`` installs it); without it these tests skip with that reason.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.browser import chromium, render

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "out" / "screenshots"
REMOTE_SCRIPT = re.compile(r"<script[^>]+src=[\"']?(https?:)?//", re.IGNORECASE)

pytestmark = pytest.mark.skipif(chromium() is None, reason="chromium is not installed (apt-get install chromium)")


def _basic_report(out: Path) -> Path:
    import plotly.graph_objects as go

    from icl_circuits.report import Section, attention_html, figure_html, write_report

    pattern = torch.softmax(torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)), -1).tril()
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    body = figure_html(fig) + attention_html(["<bos>", "a", "->", "b"], pattern, ["L0H0", "L0H1"])
    return write_report(out / "basic.html", "basic", [Section("one", body, "a reading")], {"seed": 0})


REPORTS: dict[str, tuple[Callable[[Path], Path], int, int]] = {
    # kind: (builder writing the report into a folder, min plotly figures, min circuitsvis canvases)
    "basic": (_basic_report, 1, 1),
}


@pytest.mark.parametrize("kind", sorted(REPORTS))
def test_report_renders_offline(kind, tmp_path):
    build, min_plots, min_views = REPORTS[kind]
    path = build(tmp_path)
    html = path.read_text()
    assert not REMOTE_SCRIPT.search(html), "report loads a remote script"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = render(path, SHOTS / f"{kind}.png")
    assert page.console_errors == []
    assert page.dom.count('class="main-svg"') >= min_plots, "plotly figures did not render"
    assert page.dom.count("<canvas") >= min_views, "circuitsvis views did not render"
    assert page.screenshot.is_file() and page.screenshot.stat().st_size > 10_000
