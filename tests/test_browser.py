"""Every kind of HTML report opens in headless Chromium offline, renders its plots and views, logs no JS errors.

Screenshots land in ``out/screenshots/`` for inspection. Chromium comes from Debian's ``chromium``
package (``.ci/run`` installs it); without it these tests skip with that reason, and in CI (``CI=true``) fail.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.browser import chromium, render
from tests.helpers import skip_or_fail_in_ci
from tests.test_results import figures_in_page

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "out" / "screenshots"
REMOTE_SCRIPT = re.compile(r"<script[^>]+src=[\"']?(https?:)?//", re.IGNORECASE)

pytestmark = pytest.mark.browser


@pytest.fixture(autouse=True)
def _needs_chromium() -> None:
    if chromium() is None:
        skip_or_fail_in_ci("chromium is not installed (apt-get install chromium)")


def _basic_report(out: Path) -> Path:
    import plotly.graph_objects as go

    from icl_circuits.report import Section, attention_html, figure_html, write_report

    pattern = torch.softmax(torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0)), -1).tril()
    fig = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]]))
    body = figure_html(fig) + attention_html(["<bos>", "a", "->", "b"], pattern, ["L0H0", "L0H1"])
    return write_report(out / "basic.html", "basic", [Section("one", body, "a reading")], {"seed": 0})


def _head_scan_report(out: Path) -> Path:
    from icl_circuits import load_model
    from icl_circuits.heads.report import save_head_scan
    from icl_circuits.heads.scan import scan_heads
    from tests.llama2c_reference import random_checkpoint

    model = load_model(str(random_checkpoint(out / "gqa.bin", L=3, n_kv=2, seq_len=40)), device="cpu")
    scan = scan_heads(model, seq_len=6, batch=4, seed=0, progress=False)
    return save_head_scan(scan, model, out)[1]


def _analysis_report(name: str) -> Callable[[Path], Path]:
    """A builder for the report of analysis ``name`` on a random 2-layer model of the fixture vocabulary."""

    def build(out: Path) -> Path:
        from icl_circuits.analyze import ANALYSES, save_analysis
        from tests.analyze.conftest import load_fixture_like
        from tests.analyze.test_run import SMALL

        model, _ = load_fixture_like(out / "model")
        result = ANALYSES[name].run(model, seed=0, progress=False, **SMALL[name])
        return save_analysis(result, model, out, seed=0)[1]

    return build


def _fast_weights_report(out: Path) -> Path:
    from icl_circuits.cli import main
    from tests.analyze.conftest import load_fixture_like

    _, model_dir = load_fixture_like(out / "model")
    args = ["fast-weights", "--model", str(model_dir), "--task", "fixture-recorded0", "--shots", "3", "--n", "8"]
    assert main([*args, "--heads", "1.0,1.1", "--no-predictions", "--out", str(out / "fw")]) == 0
    return out / "fw" / "fast_weights.html"


def _attribution_report(out: Path) -> Path:
    from icl_circuits.cli import main

    args = ["attribute", "--model", "fixture:induction-2l", "--task", "fixture-bound", "--shots", "4", "--n", "4"]
    assert main([*args, "--function-vectors", "--out", str(out / "att")]) == 0
    return out / "att" / "attribution.html"


#: The DOM group plotly draws for each trace of a type (one per trace), to check that every trace was drawn.
DRAWN = {"scatter": r'class="trace scatter', "bar": r'class="trace bars"', "box": r'class="trace boxes"',
         "heatmap": r'class="hm"'}  # fmt: skip

REPORTS: dict[str, tuple[Callable[[Path], Path], int, int]] = {
    # kind: (builder writing the report into a folder, min plotly figures, min circuitsvis canvases)
    "basic": (_basic_report, 1, 1),
    "head_scan": (_head_scan_report, 7, 1),
    "fast_weights": (_fast_weights_report, 2, 0),
    # 3 method heatmaps, positions, 2 per-demo heatmaps, paths, function vectors; the top heads' attention view
    "attribution": (_attribution_report, 8, 1),  # 6 metric heatmaps + the composition figure; one attention view
    "analysis_order": (_analysis_report("order"), 2, 0),
    "analysis_shots_and_noise": (_analysis_report("shots-and-noise"), 3, 0),
    "analysis_unseen_task": (_analysis_report("unseen-task"), 2, 0),
    "analysis_repetition": (_analysis_report("repetition"), 2, 0),
    "analysis_label_binding": (_analysis_report("label-binding"), 1, 0),
    "analysis_information_flow": (_analysis_report("information-flow"), 2, 1),  # + the saliency view
    "analysis_record_vs_circuit": (_analysis_report("record-vs-circuit"), 6, 0),  # each part's main figure
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
    # the page inlines the 1.5 MB cartesian bundle (every trace type is one of it), and every figure rendered
    assert "plotly.js (cartesian - minified)" in html[:5000] and len(html) < 3_500_000
    rendered = re.findall(r'<div[^>]*class="[^"]*\bjs-plotly-plot\b', page.dom)  # the class plotly adds once drawn
    assert len(rendered) == html.count("Plotly.newPlot("), "a figure did not render"
    wanted, drawn = Counter(), Counter()  # every trace drawn: one plotly DOM group per trace of each type
    for fig in figures_in_page(html):
        wanted.update(t.type for t in fig.data)
    for kind_, marker in DRAWN.items():
        drawn[kind_] = len(re.findall(marker, page.dom))
    assert set(wanted) <= set(DRAWN), f"trace types without a drawn-check: {set(wanted) - set(DRAWN)}"
    assert {k: drawn[k] for k in wanted} == dict(wanted), f"drawn {dict(drawn)}, in the page {dict(wanted)}"
    assert page.dom.count("<canvas") >= min_views, "circuitsvis views did not render"
    assert page.screenshot.is_file() and page.screenshot.stat().st_size > 10_000
