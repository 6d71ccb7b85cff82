"""Task files and the registry: required tasks, malformed files, fixture tasks."""

from __future__ import annotations

import pytest

from icl_circuits import TaskError
from icl_circuits.tasks import corpus
from icl_circuits.tasks.prompts import (
    build_prompts,
)
from icl_circuits.tasks.registry import (
    FixtureTask,
    SubstitutedTask,
    file_tasks,
    get_task,
    load_task_file,
)

REQUIRED = [
    "antonym", "country-capital", "english-french", "present-past",
    "lowercase-uppercase", "singular-plural", "word-first-letter", "number-successor",
]  # fmt: skip


@pytest.mark.unit
def test_task_files_cover_the_required_tasks():
    tasks = file_tasks()
    for name in REQUIRED:
        assert name in tasks, name
        t = tasks[name]
        assert t.size >= 50 and len({p.input for p in t.pairs}) == t.size
    assert tasks["country-capital"].lookup("France") == "Paris"
    assert tasks["number-successor"].lookup("9") == "10"


@pytest.mark.unit
@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"input": "a", "output": "b"}', "expected a JSON list"),
        ('[{"input": "a"}]', "item 0"),
        ('[{"input": "a", "output": ""}, {"input": "b", "output": "c"}]', "item 0"),
        ('[{"input": "a", "output": "b"}, {"input": "a", "output": "c"}]', "'a' appears twice"),
        ('[{"input": "a", "output": "b"}]', "needs at least 2"),
    ],
)
def test_malformed_task_file_names_file_and_problem(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TaskError, match=match) as info:
        load_task_file(path)
    assert "bad.json" in str(info.value)


@pytest.mark.unit
def test_get_task_names_and_unknown():
    assert isinstance(get_task("fixture-rule-shift12"), FixtureTask)
    assert get_task("fixture-rule-shift12").shift == 12
    sub = get_task("antonym:substituted")
    assert isinstance(sub, SubstitutedTask) and sub.base.name == "antonym"
    with pytest.raises(TaskError, match="unknown task 'no-such-task'.*antonym"):
        get_task("no-such-task")


@pytest.mark.fixture
def test_fixture_tasks_read_the_models_corpus(fixture_like, tmp_path):
    from icl_circuits.tasks.registry import corpus_config_for

    assert corpus_config_for(fixture_like) == corpus.CorpusConfig()
    assert corpus_config_for(None) == corpus.CorpusConfig()


@pytest.mark.fixture
def test_substituted_binding_probe(fixture_like):
    ps = build_prompts(fixture_like, get_task("fixture-bound-unseen"), 5, 20, seed=0)
    for p in ps.prompts:
        labels = [d.output for d in p.example.demos]
        assert set(labels) <= set(corpus.UPPER + corpus.DIGITS) and len(set(labels)) == len(labels)
        assert p.example.query in p.example.demos
    # a fixed substitution keeps one label -> symbol map across prompts
    fixed = SubstitutedTask(get_task("fixture-recorded0"), per_prompt=False, query_in_demos=False)
    ps = build_prompts(fixture_like, fixed, 4, 20, seed=0)
    seen: dict[str, str] = {}
    for p in ps.prompts:
        for d in (*p.example.demos, p.example.query):
            assert seen.setdefault(d.input, d.output) == d.output


# ---------------------------------------------------------------- the arbitrary-map (unseen) tasks


@pytest.mark.unit
def test_arbitrary_map_is_fixed_by_its_seed_and_puts_the_query_among_the_demos():
    import numpy as np

    from icl_circuits.tasks.registry import UNSEEN_TASKS, ArbitraryMapTask, all_tasks

    tasks = all_tasks()
    assert all(isinstance(tasks[name], ArbitraryMapTask) for name in UNSEEN_TASKS)
    a = ArbitraryMapTask("m", ["x1", "x2", "x3", "x4"], ["A", "B", "C", "D"], map_seed=3)
    assert a.pairs == ArbitraryMapTask("m", ["x1", "x2", "x3", "x4"], ["A", "B", "C", "D"], map_seed=3).pairs
    assert sorted(p.output for p in a.pairs) == ["A", "B", "C", "D"]  # as many labels as inputs: injective
    rng = np.random.default_rng(0)
    for k in (1, 2, 4):
        ex = a.draw(rng, k)
        assert ex.query in ex.demos and len({d.input for d in ex.demos}) == k
    control = a.with_query_in_demos(False)
    assert control.pairs == a.pairs and control.max_shots == 3
    assert all(ex.query not in ex.demos for ex in (control.draw(rng, 3) for _ in range(5)))
    kept = a.without_labels(frozenset({"A"}))
    assert "A" not in kept.labels and kept.query_in_demos and kept.map_seed == 3


@pytest.mark.real_model
@pytest.mark.parametrize("name", ["arbitrary-country-word", "arbitrary-word-symbol"])
def test_arbitrary_map_tasks_are_unseen_by_smollm2_and_learnable_in_context(smollm2, name):
    """Unseen: zero-shot accuracy, and accuracy at 4 shots when the query is never among the demos, stay
    near chance. Learnable in context: with the query among the demos, accuracy at 1 and 4 shots is well
    above chance (it need not grow from 1 to 4 shots: more demos are more distractors for the copy)."""
    from icl_circuits.tasks.scoring import evaluate

    task = get_task(name, smollm2)
    ev = evaluate(smollm2, task, [0, 1, 4], n=24, seed=0)
    acc = {r["shots"]: r["accuracy"] for r in ev.rows}
    near_chance = max(3 * ev.chance, 0.1)
    assert acc[0] <= near_chance, (acc, ev.chance)
    assert min(acc[1], acc[4]) >= near_chance + 0.1, (acc, ev.chance)
    held_out = evaluate(smollm2, task.with_query_in_demos(False), [4], n=24, seed=0)
    assert held_out.rows[0]["accuracy"] <= near_chance, (held_out.rows, ev.chance)
