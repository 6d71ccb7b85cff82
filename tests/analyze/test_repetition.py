"""Repeated demos: the prediction rows against plain forwards of the repeated prompts."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.analyze.repetition import run_repetition
from icl_circuits.tasks.prompts import build_prompts, pad_right
from icl_circuits.tasks.registry import get_task

pytestmark = pytest.mark.fixture


def test_rows_equal_plain_forwards_of_the_repeated_prompts(fixture_like):
    """accuracy, logit_diff = logit[answer] - logit[contrast], prob and ``unchanged`` (argmax as at r = 1), per r,
    from one padded forward of ``build_prompts(..., repeat=r)``; r = 4 exceeds the 64-token context at 4 shots
    (1 + 4 * 4 * 4 + 2 tokens) and is listed as skipped."""
    model, _ = fixture_like
    r = run_repetition(model, seed=1, n=5, tasks=["fixture-bound"], repeats=(1, 2, 4), fast_weights=False,
                       progress=False)  # fmt: skip
    assert [row["repeat"] for row in r.rows] == [1, 2]
    assert r.skipped == ("fixture-bound: r = 4 (longer than the context)",)
    first = None
    for row in r.rows:
        ps = build_prompts(model, get_task("fixture-bound", model), 4, 5, 1, repeat=row["repeat"])
        tokens, last = pad_right(ps.tokens, 1)
        with torch.no_grad():
            final = model(tokens)[torch.arange(5), last].float()
        answer, contrast = torch.tensor(ps.answer_ids), torch.tensor(ps.contrast_ids)
        rows = torch.arange(5)
        pred = final.argmax(-1)
        first = pred if first is None else first
        assert row["accuracy"] == pytest.approx(float((pred == answer).float().mean()))
        assert row["logit_diff"] == pytest.approx(float((final[rows, answer] - final[rows, contrast]).mean()), abs=1e-4)
        assert row["prob"] == pytest.approx(float(final.softmax(-1)[rows, answer].mean()), abs=1e-6)
        assert row["unchanged"] == pytest.approx(float((pred == first).float().mean()))


def test_reading_at_chance_reads_no_repetition_effect(fixture_like):
    """At chance at every r the reading says so instead of reading the change; above chance it reads it."""
    from dataclasses import replace

    model, _ = fixture_like
    r = run_repetition(model, seed=1, n=5, tasks=["fixture-bound"], repeats=(1, 2), fast_weights=False,
                       progress=False)  # fmt: skip
    assert r.at_chance("fixture-bound") and r.findings()["at_chance"] is True
    assert "at chance" in r.findings()["reading"] and "not read" in r.findings()["reading"]
    learnt = replace(r, rows=tuple({**row, "accuracy": 1.0} for row in r.rows))
    assert not learnt.at_chance("fixture-bound") and "not read" not in learnt.findings()["reading"]
    assert "accuracy stays at 1.00" in learnt.findings()["reading"]
