"""Demo order: permutations, fixed mappings and queries."""

from __future__ import annotations

import numpy as np
import pytest

from icl_circuits.analyze.order import demo_set_queries, fix_mapping, orders
from icl_circuits.tasks import corpus
from icl_circuits.tasks.prompts import check_task
from icl_circuits.tasks.registry import FixtureTask


@pytest.mark.unit
def test_orders_queries_and_fixed_mappings():
    rng = np.random.default_rng(0)
    all_perms = orders(3, 24, rng)
    assert len(all_perms) == 6 and len(set(all_perms)) == 6
    some = orders(5, 10, rng)
    assert len(some) == 10 and len(set(some)) == 10 and some[0] == (0, 1, 2, 3, 4)
    rule = FixtureTask("rule")
    fixed = fix_mapping(rule, rng)
    assert fixed.shift in rule.cfg.train_shifts and fixed.name == rule.name
    bound = FixtureTask("bound")
    assert fix_mapping(bound, rng) is bound  # a fresh binding per prompt: nothing to fix


@pytest.mark.fixture
def test_demo_set_queries(fixture_like):
    model, _ = fixture_like
    rng = np.random.default_rng(0)
    rule = FixtureTask("rule", shift=2)
    checked = check_task(model, rule)
    demos = rule.draw(rng, 4).demos
    qs = demo_set_queries(checked, rule, demos, 6, rng)
    assert len(qs) == 6 and not {q.input for q in qs} & {d.input for d in demos}
    assert all(q.output == corpus.shift_map(2)[q.input] for q in qs)
    bound = FixtureTask("bound")
    demos = bound.draw(rng, 4).demos
    assert set(demo_set_queries(check_task(model, bound), bound, demos, 8, rng)) == set(demos)


@pytest.mark.fixture
def test_reading_at_chance_reads_no_order_effect(fixture_like):
    """An untrained model is at chance: the reading says so and names no head; above chance it reads both."""
    from dataclasses import replace

    from icl_circuits.analyze.order import run_order

    model, _ = fixture_like
    r = run_order(model, seed=0, n=2, n_orders=4, queries=3, shots=3, tasks=["fixture-bound"], progress=False)
    assert r.at_chance("fixture-bound")
    text = r.findings()["reading"]
    assert "is at chance" in text and "Heads whose attribution" not in text and r.findings()["top_head"] is None
    learnt = replace(r, rows=tuple({**row, "label_accuracy": 0.9 + 0.02 * row["order"]} for row in r.rows))
    assert not learnt.at_chance("fixture-bound") and "Heads whose attribution moves most" in learnt._reading(
        "fixture-bound") and learnt.findings()["top_head"] is not None
