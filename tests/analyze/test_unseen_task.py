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
