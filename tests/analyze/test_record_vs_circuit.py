"""Record vs circuit: collects every analysis and writes each part."""

from __future__ import annotations

import pytest

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
