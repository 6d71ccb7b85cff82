"""Record vs circuit: collects every analysis and writes each part."""

from __future__ import annotations

import pytest

from icl_circuits import InputError
from icl_circuits.analyze import ANALYSES, run_analysis, save_analysis

pytestmark = pytest.mark.fixture


def test_record_vs_circuit_collects_all_and_writes_each_part(fixture_like, tmp_path):
    model, _ = fixture_like
    r = run_analysis("record-vs-circuit", model, n=4, progress=False)
    assert [p.name for p in r.parts] == [n for n in ANALYSES if n != "record-vs-circuit"]
    assert len(r.rows()) == 6 and all(row["reading"] for row in r.rows())
    save_analysis(r, model, tmp_path, seed=0)
    assert {p.stem for p in tmp_path.glob("*.json")} == {n.replace("-", "_") for n in ANALYSES}
    assert [p.name for p in tmp_path.glob("*.html")] == ["record_vs_circuit.html"]  # one page, one plotly.js
    page = (tmp_path / "record_vs_circuit.html").read_text()
    assert page.count("<script type=\"text/javascript\">") == 1
    for part in r.parts:  # every part's sections are on the page, each part reachable by a link
        assert f'id="{part.name}"' in page and f'href="#{part.name}"' in page
        assert all(s.title in page for s in part.sections())


def test_summary_says_not_read_at_chance(fixture_like):
    """An observation at chance leaves its interpretive measures unread, and the summary table says why."""
    from icl_circuits.analyze.record_vs_circuit import RecordVsCircuit

    model, _ = fixture_like
    order = ANALYSES["order"].run(model, seed=0, n=2, n_orders=4, queries=3, shots=3, tasks=["fixture-bound"],
                                  progress=False)  # fmt: skip
    assert order.findings()["at_chance"] is True
    rvc = RecordVsCircuit("m", 0, (order,))
    (row,) = rvc.rows()
    assert "head moving most: not read (at chance)" in row["measures"] and "is at chance" in row["reading"]


def test_options_size_each_part_and_unknown_ones_raise(fixture_like):
    """``options``: per part, run-function keywords that replace its defaults (a part's ``n`` replaces the run's)."""
    model, _ = fixture_like
    r = ANALYSES["record-vs-circuit"].run(model, n=2, progress=False, options={
        "order": {"n_orders": 2, "queries": 2, "shots": 3}, "shots-and-noise": {"shots": (0, 2), "noise": (0.5,)},
        "unseen-task": {"shots": (0, 2), "head_shots": 2, "n": 3}, "repetition": {"repeats": (1, 2)},
        "label-binding": {"heads": [(1, 0)], "n_controls": 1}})  # fmt: skip
    order, noise, unseen, rep, binding, _ = r.parts
    assert (order.n_orders, order.shots, len(order.rows)) == (2, 3, 2 * 2 * 2)  # tasks x sets x orders
    assert {g["shots"] for g in noise.grid} == {0, 2} and {g["noise"] for g in noise.grid} == {0.0, 0.5}
    assert unseen.head_shots == 2 and {row["n"] for row in unseen.rows} == {3}
    assert {row["repeat"] for row in rep.rows} == {1, 2}
    assert binding.induction_heads == ((1, 0),) and binding.n_controls == 1
    with pytest.raises(InputError, match="no part 'orders'.*order, shots-and-noise"):
        ANALYSES["record-vs-circuit"].run(model, n=2, progress=False, options={"orders": {}})
    with pytest.raises(InputError, match="'order' takes no n_order; it takes n, tasks, shots, n_orders"):
        ANALYSES["record-vs-circuit"].run(model, n=2, progress=False, options={"order": {"n_order": 2}})
