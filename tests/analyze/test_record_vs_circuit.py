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
    assert {p.stem for p in tmp_path.glob("*.html")} == {n.replace("-", "_") for n in ANALYSES}
