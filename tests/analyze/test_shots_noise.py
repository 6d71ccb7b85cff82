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


def _result(accuracy: float, beta: float):
    from icl_circuits.analyze.shots_noise import ShotsAndNoise

    grid = tuple({"task": "t", "shots": k, "noise": p, "flipped": p, "accuracy": accuracy if k else 0.0,
                  "logit_diff": 0.1, "prob": 0.04, "rank": 12.0} for k in (0, 8) for p in (0.0, 0.5))  # fmt: skip
    shrink = tuple({"task": "t", "shots": 8, "noise": p, "flipped": p, "beta": 1.0 if p == 0 else beta,
                    "kl_to_zero_shot": 0.2 - 0.1 * p, "answer_prob": 0.04, "label_accuracy": accuracy}
                   for p in (0.0, 0.5))  # fmt: skip
    return ShotsAndNoise("m", 0, 64, 8, grid, shrink, {"t": 1 / 26})


@pytest.mark.unit
def test_reading_at_chance_accuracy_reads_no_beta():
    """induction-2l: accuracy 0.00 at every shot count; the reading must not interpret beta = 0.95."""
    from icl_circuits.tasks.scoring import at_chance

    chance = _result(0.0, 0.95)
    assert chance.at_chance("t")
    text = " ".join(p for s in chance.sections() for p in s.paragraphs) + chance.findings()["reading"]
    assert "at chance" in text and "beta is not read" in text
    assert "0.95" not in text and "beta =" not in text and "moves back" not in text
    assert chance.findings()["beta_half_noise"] is None and chance.findings()["at_chance"] is True
    learnt = _result(0.9, 0.5)  # well above chance: beta is read
    assert not learnt.at_chance("t") and "beta = 0.50" in learnt.findings()["reading"]
    assert learnt.findings()["beta_half_noise"] == 0.5
    # the bound: 2 binomial standard errors above chance
    assert at_chance(0.5, 0.5, 100) and at_chance(0.6, 0.5, 100) and not at_chance(0.61, 0.5, 100)


@pytest.mark.unit
def test_shrink_figure_one_colour_and_one_legend_entry_per_task():
    """beta and accuracy panels: the task's colour in both, a single legend entry per task (not per panel)."""
    r = _result(0.9, 0.5)
    shrink = r.figures()[-1]
    assert {t.line.color for t in shrink.data} == {shrink.data[0].line.color}
    assert [t.name for t in shrink.data if t.showlegend is not False] == ["t"]
    at_chance = _result(0.0, 0.95).figures()[-1]
    assert at_chance.data[0].name == "t (at chance: beta not read)"
