"""Label binding on the trained fixture: the bound task needs the induction heads."""

from __future__ import annotations

import pytest

from icl_circuits.analyze import ANALYSES

pytestmark = pytest.mark.fixture


def test_icl_tiny_bound_task_needs_its_induction_heads(icl_tiny):
    """The fixture solves the bound task from context (MANIFEST: bound accuracy 1.00 at 8 shots), and ablating
    the head scan's induction heads hurts it more than ablating as many other heads (the circuit, not any four
    heads). A fixture that no longer solves the task is a regression: it fails here."""
    r = ANALYSES["label-binding"].run(icl_tiny, n=64, tasks=["fixture-bound"], progress=False)
    own = next(row for row in r.rows if row["labels"] == "own")
    assert own["accuracy"] >= 0.5, f"fixture-bound accuracy {own['accuracy']:.2f}: icl-tiny no longer solves the task"
    assert r.induction_heads, "the head scan found no induction head in icl-tiny"
    assert own["accuracy"] - own["accuracy_ablated"] > own["accuracy"] - own["accuracy_control"]


def test_reading_near_chance_tells_no_dependence():
    """A task within MIN_MARGIN of chance has nothing to lose: 'too close to chance to tell', not 'depends'."""
    from icl_circuits.analyze.label_binding import MIN_MARGIN, LabelBinding

    def row(task, accuracy, ablated):
        return {"task": task, "labels": "own", "shots": 4, "n": 64, "chance": 0.25, "accuracy": accuracy,
                "logit_diff": 0.0, "accuracy_ablated": ablated, "logit_diff_ablated": 0.0,
                "accuracy_control": accuracy, "logit_diff_control": 0.0}  # fmt: skip

    r = LabelBinding("m", 0, 64, 4, ((1, 0),), "scan", 2,
                     (row("near", 0.25 + MIN_MARGIN / 2, 0.25), row("far", 0.95, 0.25)))  # fmt: skip
    assert r.depends(r.rows[0]) is None and r.depends(r.rows[1]) is True
    text = r.findings()["reading"]
    assert "too close to chance to tell: near (own)" in text and "depend on them: far (own)" in text
    paragraphs = r.sections()[0].paragraphs  # split per task on the page, not one long paragraph
    assert len(paragraphs) == 4 and paragraphs[1].startswith("near: own labels") and paragraphs[2].startswith("far:")
