"""Seen and unseen tasks."""

from __future__ import annotations

import pytest

from icl_circuits.analyze import ANALYSES
from icl_circuits.analyze.unseen_task import classify
from icl_circuits.tasks import corpus
from icl_circuits.tasks.registry import UNSEEN_TASKS


@pytest.mark.unit
def test_classify_seen_and_unseen():
    cfg = corpus.CorpusConfig()
    assert classify("fixture-rule-shift2", cfg) == "seen" and classify("fixture-rule-shift7", cfg) == "unseen"
    assert classify("antonym:substituted", cfg) == "unseen" and classify("antonym", cfg) == "seen"
    assert all(classify(name, cfg) == "unseen" for name in UNSEEN_TASKS)


@pytest.mark.fixture
def test_unseen_task_adds_substituted_variants_when_none_is_unseen(fixture_like):
    model, _ = fixture_like
    r = ANALYSES["unseen-task"].run(model, tasks=["fixture-rule-shift1"], n=4, shots=(1,), head_shots=1,
                                    progress=False)  # fmt: skip
    assert {row["task"] for row in r.rows} == {"fixture-rule-shift1", "fixture-rule-shift1:substituted"}
    assert set(r.head_effects) == {"seen", "unseen"}


@pytest.mark.fixture
def test_reading_at_chance_names_no_responsible_head(fixture_like):
    """Unseen tasks at chance at their most shots: no head is read as responsible (nor correlated)."""
    from dataclasses import replace

    model, _ = fixture_like
    r = ANALYSES["unseen-task"].run(model, tasks=["fixture-rule-shift1"], n=4, shots=(1,), head_shots=1,
                                    progress=False)  # fmt: skip
    assert r.group_at_chance("unseen") and r.findings()["unseen_at_chance"] is True
    text = r.findings()["reading"]
    assert "stay at chance" in text and "Heads whose ablation" not in text and "correlate" not in text
    assert r.findings()["top_unseen_head"] is None
    learnt = replace(r, rows=tuple({**row, "accuracy": 1.0} for row in r.rows))
    assert not learnt.group_at_chance("unseen") and "Heads whose ablation lowers" in learnt.findings()["reading"]
    assert learnt.findings()["top_unseen_head"] is not None
