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
