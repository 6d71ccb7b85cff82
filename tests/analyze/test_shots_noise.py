"""Shots and label noise: the shrink coefficient and the grid against evaluate."""

from __future__ import annotations

import math

import pytest

from icl_circuits.analyze import ANALYSES


@pytest.mark.fixture
def test_icl_tiny_grid_agrees_with_evaluate(icl_tiny):
    from icl_circuits.tasks.scoring import evaluate

    r = ANALYSES["shots-and-noise"].run(icl_tiny, n=32, tasks=["fixture-rule"], shots=(0, 8), noise=(0.0, 0.5),
                                        progress=False)  # fmt: skip
    ev = evaluate(icl_tiny, "fixture-rule", shots=(8,), n=32, noise=0.5)
    assert r.value("fixture-rule", 8, 0.5) == pytest.approx(ev.accuracy(8))
    assert all(math.isfinite(row["beta"]) for row in r.shrink)
