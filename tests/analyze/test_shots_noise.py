"""Shots and label noise: the shrink coefficient and the grid against evaluate."""

from __future__ import annotations

import math

import pytest
import torch

from icl_circuits.analyze import ANALYSES
from icl_circuits.analyze.shots_noise import shrink_coefficient


@pytest.mark.unit
def test_shrink_coefficient_analytic():
    g = torch.Generator().manual_seed(0)
    zero, clean = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert shrink_coefficient(clean, clean, zero) == pytest.approx(1.0)
    assert shrink_coefficient(zero, clean, zero) == pytest.approx(0.0, abs=1e-6)
    assert shrink_coefficient(zero + 0.25 * (clean - zero), clean, zero) == pytest.approx(0.25, rel=1e-5)


@pytest.mark.fixture
def test_icl_tiny_grid_agrees_with_evaluate(icl_tiny):
    from icl_circuits.tasks.scoring import evaluate

    r = ANALYSES["shots-and-noise"].run(icl_tiny, n=32, tasks=["fixture-rule"], shots=(0, 8), noise=(0.0, 0.5),
                                        progress=False)  # fmt: skip
    ev = evaluate(icl_tiny, "fixture-rule", shots=(8,), n=32, noise=0.5)
    assert r.value("fixture-rule", 8, 0.5) == pytest.approx(ev.accuracy(8))
    assert all(math.isfinite(row["beta"]) for row in r.shrink)
