"""One interface for every result type (icl_circuits.results), checked on an instance of each.

The result types are collected from the package (every subclass of ``Result``, and every class that
has a result-like method must be one), so a new type cannot be forgotten: it fails here until
``instances`` below builds one. The instances come from small runs on a random 2-layer model in the
fixture format (untrained: the surface, not the science, is under test).
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import pkgutil
import re
import warnings
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import pytest

import icl_circuits
from icl_circuits.results import Result, combine_figures
from tests.analyze.conftest import load_fixture_like

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_METHODS = ("to_dataframe", "_repr_html_", "plot", "figures", "findings")


def _package_classes() -> list[type]:
    out = []
    for info in pkgutil.walk_packages(icl_circuits.__path__, "icl_circuits."):
        mod = importlib.import_module(info.name)
        out += [c for _, c in inspect.getmembers(mod, inspect.isclass) if c.__module__ == mod.__name__]
    return out


CLASSES = _package_classes()
RESULT_TYPES = sorted((c for c in CLASSES if issubclass(c, Result) and not inspect.isabstract(c)
                       and c.__name__ != "AnalysisMixin"), key=lambda c: c.__name__)  # fmt: skip


@pytest.mark.unit
def test_every_class_with_a_result_method_is_a_result():
    loose = [f"{c.__module__}.{c.__name__}" for c in CLASSES if not issubclass(c, Result)
             and not getattr(c, "_is_protocol", False) and any(m in vars(c) for m in RESULT_METHODS)]  # fmt: skip
    assert not loose, f"give these the Result surface (icl_circuits.results.Result): {loose}"
    assert len(RESULT_TYPES) >= 19


def legend_color_problems(figs: list[go.Figure]) -> list[str]:
    """Where a legend entry's colour may differ from its traces': every trace that shares a name (or legend
    group) with another, or hides its legend entry, must set its colour, and one name has one colour across all
    ``figs`` (one colour per task in every panel of a report)."""
    seen: dict[str, set[str]] = {}
    count: dict[str, int] = {}
    for fig in figs:
        for t in fig.data:
            key = t.legendgroup or t.name
            if key:
                count[key] = count.get(key, 0) + 1
    problems = []
    for fig in figs:
        for t in fig.data:
            if t.type in ("heatmap", "histogram2d", "contour"):
                continue
            key = t.legendgroup or t.name
            colour = _colour(t)
            if key is None:
                continue
            if colour is None and (count[key] > 1 or t.showlegend is False):
                problems.append(f"{fig.layout.title.text!r}: trace {t.name!r} sets no colour")
            if colour is not None:
                seen.setdefault(key, set()).add(colour)
    problems += [f"{k!r} drawn in {sorted(v)}" for k, v in seen.items() if len(v) > 1]
    return problems


def _colour(t) -> str | None:
    for part in ("marker", "line"):
        obj = getattr(t, part, None)
        c = getattr(obj, "color", None) if obj is not None else None
        if isinstance(c, str):
            return c
    return None


def _lab_results(run_dir):
    """A 4-step run of the shipped phase-change config (2 checkpoints) and its dynamics."""
    from dataclasses import replace

    import torch

    import icl_circuits.lab.train as lt
    from icl_circuits.lab.config import load_config
    from icl_circuits.lab.dynamics import run_dynamics

    before = torch.get_num_threads()
    try:
        cfg = replace(load_config("analyses/lab/phase_change.toml"), steps=4, checkpoint_every=4)
        run = lt.train(cfg, run_dir / "run", threads=1, progress=False)
    finally:
        torch.set_num_threads(before)
    from icl_circuits.lab.sweep import run_sweep

    (run_dir / "sweep.toml").write_text(f'[sweep]\nbase = "{REPO_ROOT / "analyses/lab/phase_change.toml"}"\n'
                                        '[grid]\nsteps = [4]\ncheckpoint_every = [4]\n[dynamics]\nn = 4\n')
    try:  # a one-cell sweep of the same run
        sweep = run_sweep(run_dir / "sweep.toml", run_dir / "sweep", engine="local", threads=1, progress=False)
    finally:
        torch.set_num_threads(before)
    return [run, run_dynamics(run_dir / "run", n=4, progress=False), sweep]


@pytest.fixture(scope="module")
def instances(tmp_path_factory):
    from icl_circuits.analyze import run_analysis
    from icl_circuits.attribution.job import attribute
    from icl_circuits.fast_weights.job import run_fast_weights
    from icl_circuits.fast_weights.regression import LinearSelfAttention, LSAConfig, compare_with_gd
    from icl_circuits.heads.scan import scan_heads
    from icl_circuits.patching.atp import attribution_patch
    from icl_circuits.tasks.scoring import evaluate

    model, _ = load_fixture_like(tmp_path_factory.mktemp("results_model"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained model's notes (tiny logit-difference gap)
        att = attribute(model, "fixture-bound", shots=3, n=4, method="patching", positions=True, paths=False,
                        function_vectors=True, progress=False)  # fmt: skip
    b = att.batch
    atp = attribution_patch(model, b.clean_tokens, b.corrupted_tokens, b.answer_tokens, b.contrast_tokens, "z",
                            answer_positions=b.last_positions)  # fmt: skip
    run = run_fast_weights(model, "fixture-recorded0", 3, n=6, n_top=2)
    rvc = run_analysis("record-vs-circuit", model, n=4, progress=False)
    found = [evaluate(model, "fixture-bound", shots=(0, 2), n=4), scan_heads(model, seq_len=6, batch=2, progress=False),
             att, att.heads["patching"], att.demos, att.function_vectors, atp, atp.agreement(att.heads["patching"]),
             run, run.fast_weights, run.transplant, run.predictions, rvc, *rvc.parts,
             compare_with_gd(LinearSelfAttention(LSAConfig(d=2)), n_demos=(1, 2), batch=16)]  # fmt: skip
    found += _lab_results(tmp_path_factory.mktemp("lab_run"))
    out: dict = {type(r): r for r in found if r is not None}
    out["model"] = model
    return out


def figures_in_page(page: str) -> list[go.Figure]:
    """Every plotly figure of a report page, rebuilt from the data and layout its script passes to plotly."""
    figs, dec = [], json.JSONDecoder()
    for m in re.finditer(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*", page):
        data, end = dec.raw_decode(page, m.end())
        layout, _ = dec.raw_decode(page, page.index("{", end))
        figs.append(go.Figure({"data": data, "layout": layout}))
    return figs


REPORTS = ["HeadScan", "Attribution", "FastWeightsRun", "RecordVsCircuit"] + [
    c.__name__ for c in RESULT_TYPES if hasattr(c, "sections") and c.__name__ != "RecordVsCircuit"]


@pytest.mark.fixture
@pytest.mark.parametrize("name", sorted(set(REPORTS)))
def test_report_figures_legend_colours_match_traces(name, instances):
    """Every figure of every report page (the result's panels and the ones its sections add): a trace's colour
    is its legend entry's, one colour per series across the page; heatmap axes are categorical (L0.., H0..)."""
    from icl_circuits.attribution.job import attribution_sections
    from icl_circuits.heads.report import head_scan_sections
    from icl_circuits.report import render_page

    r = next(v for k, v in instances.items() if isinstance(k, type) and k.__name__ == name)
    if name == "HeadScan":
        sections = head_scan_sections(r, instances["model"])
    elif name == "Attribution":
        sections = attribution_sections(r, instances["model"])
    else:
        sections = r.sections()
    figs = figures_in_page(render_page(name, sections))
    assert figs, f"{name}: no figure on the page"
    assert not legend_color_problems(figs), legend_color_problems(figs)
    for f in figs:
        for t in f.data:
            if t.type == "heatmap" and t.y is not None and str(t.y[0]).startswith("L"):
                assert t.x is not None and not isinstance(t.x[0], (int, float)), f"{f.layout.title.text}: numeric x"


@pytest.mark.fixture
@pytest.mark.parametrize("cls", RESULT_TYPES, ids=lambda c: c.__name__)
def test_result_surface(cls, instances):
    assert cls in instances, f"tests/test_results.py builds no {cls.__name__}: add one to `instances`"
    r = instances[cls]
    doc = r.to_dict()
    text = json.dumps(doc, allow_nan=False)  # plain JSON, no NaN
    assert json.loads(text) == json.loads(json.dumps(doc))
    df = r.to_dataframe()
    assert isinstance(df, pd.DataFrame) and len(df.columns) > 0
    figs = r.figures()
    assert figs and all(isinstance(f, go.Figure) for f in figs)
    fig = r.plot()
    assert isinstance(fig, go.Figure) and len(fig.data) == sum(len(f.data) for f in figs)
    assert not legend_color_problems(figs), legend_color_problems(figs)
    page = r._repr_html_()
    assert isinstance(page, str) and "<table" in page
    found = r.findings()
    if found is not None:
        assert isinstance(found["reading"], str) and found["reading"]
        json.dumps(found, allow_nan=False)
        assert all(v is None or isinstance(v, (int, float, str)) for v in found.values())
        assert all(not isinstance(v, float) or math.isfinite(v) for v in found.values())


@pytest.mark.unit
def test_combine_figures_keeps_every_panel_and_its_axes():
    from plotly.subplots import make_subplots

    a = go.Figure(go.Heatmap(z=[[1, 2], [3, 4]], x=["H0", "H1"], y=["L0", "L1"]))
    a.update_layout(title="A", yaxis_autorange="reversed", xaxis_title="head")
    b = make_subplots(rows=1, cols=2, subplot_titles=("left", "right"))
    b.add_trace(go.Scatter(x=[1, 2], y=[3, 4], name="s", line={"color": "#111111"}), 1, 1)
    b.add_trace(go.Bar(x=["u", "v"], y=[1, 2], name="b"), 1, 2)
    b.add_hline(y=0.5, row=1, col=2)
    b.update_layout(title="B")
    out = combine_figures([a, b], title="both")
    assert [t.type for t in out.data] == ["heatmap", "scatter", "bar"]
    assert [(t.xaxis, t.yaxis) for t in out.data] == [("x", "y"), ("x2", "y2"), ("x3", "y3")]
    assert out.layout.yaxis.autorange == "reversed" and out.layout.xaxis.title.text == "head"
    assert [a.text for a in out.layout.annotations][:3] == ["A", "B: left", "B: right"]
    assert [s.yref for s in out.layout.shapes] == ["y3"] and out.data[1].line.color == "#111111"
    assert len(a.data) == 1 and a.data[0].xaxis is None  # the inputs are not changed
    assert combine_figures([a]) is a


@pytest.mark.unit
def test_legend_check_catches_a_hidden_uncoloured_trace():
    fig = go.Figure([go.Scatter(y=[1], name="bound"), go.Scatter(y=[2], name="bound", showlegend=False)])
    assert legend_color_problems([fig])
    ok = go.Figure([go.Scatter(y=[1], name="bound", line={"color": "red"}),
                    go.Scatter(y=[2], name="bound", showlegend=False, line={"color": "red"})])  # fmt: skip
    other = go.Figure(go.Scatter(y=[1], name="bound", line={"color": "blue"}))
    assert not legend_color_problems([ok]) and legend_color_problems([ok, other])


@pytest.mark.unit
def test_renamed_keyword_warns_and_still_works():
    from icl_circuits import InputError
    from icl_circuits.results import renamed_kwargs

    @renamed_kwargs(n_prompts="n")
    def f(*, n: int = 1) -> int:
        return n

    with pytest.warns(DeprecationWarning, match=r"f\(n_prompts=...\) is renamed n="):
        assert f(n_prompts=3) == 3
    with pytest.raises(InputError, match="pass n= only"):
        f(n=1, n_prompts=2)
