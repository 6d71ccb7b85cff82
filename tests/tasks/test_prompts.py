"""Few-shot prompts: the training format, determinism, manipulations, tokenization checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_circuits import PromptTooLongError, TaskError
from icl_circuits.tasks import corpus
from icl_circuits.tasks.prompts import (
    build_prompts,
    check_task,
    continuation_ids,
    encode,
    flip_labels,
    permute_demos,
    repeat_demos,
)
from icl_circuits.tasks.registry import (
    FewShot,
    FixtureTask,
    Pair,
    PairTask,
    Template,
    get_task,
    substitution_map,
)

words = st.text(alphabet="abcdefgh", min_size=1, max_size=3)


@st.composite
def examples(draw):
    inputs = draw(st.lists(words, min_size=1, max_size=8, unique=True))
    demos = tuple(Pair(x, draw(words)) for x in inputs[:-1])
    return FewShot(demos, Pair(inputs[-1], draw(words)))


@pytest.mark.fixture
def test_fixture_prompts_match_the_training_format(fixture_like):
    """Same seed -> the same episodes as corpus.sample_episode, tokenized exactly as in training."""
    cfg = corpus.CorpusConfig()
    for family in corpus.FAMILIES:
        ps = build_prompts(fixture_like, FixtureTask(family, cfg), 4, 20, seed=3)
        rng = np.random.default_rng(3)
        for toks, answer in zip(ps.tokens, ps.answer_ids):
            ep = corpus.sample_episode(rng, cfg, family, 4, noise_rate=0.0)
            assert list(toks) == corpus.encode(ep.tokens(with_answer=False))
            assert int(answer) == corpus.TOKEN_ID[ep.answer]
        if family == "bound":
            assert all(p.example.query in p.example.demos for p in ps.prompts)
        else:
            assert all(p.example.query.input not in {d.input for d in p.example.demos} for p in ps.prompts)


@pytest.mark.fixture
def test_prompts_deterministic_and_contrast_differs(fixture_like):
    task = get_task("fixture-rule")
    a, b = build_prompts(fixture_like, task, 3, 10, seed=1), build_prompts(fixture_like, task, 3, 10, seed=1)
    c = build_prompts(fixture_like, task, 3, 10, seed=2)
    assert a.texts == b.texts and a.texts != c.texts
    assert torch.equal(a.answer_ids, b.answer_ids) and bool((a.answer_ids != a.contrast_ids).all())
    for p in a.prompts:  # the contrast is the latest demo label that is not the answer
        assert p.contrast == next(d.output for d in reversed(p.example.demos) if d.output != p.answer)
    noisy = build_prompts(fixture_like, task, 3, 10, seed=1, noise=1 / 3, permute=True)
    assert [p.example.query for p in noisy.prompts] == [p.example.query for p in a.prompts]
    assert all(sum(p.example.flipped) == 1 for p in noisy.prompts)


@pytest.mark.fixture
def test_zero_shot_and_repeat(fixture_like):
    ps = build_prompts(fixture_like, get_task("fixture-bound"), 0, 3, seed=0)
    assert all(len(t) == 3 for t in ps.tokens)  # <bos> q ->
    rep = build_prompts(fixture_like, get_task("fixture-bound"), 2, 3, seed=0, repeat=3)
    assert all(len(t) == 1 + 4 * 6 + 2 for t in rep.tokens)


@pytest.mark.fixture
def test_shots_above_pairs_and_prompt_too_long(fixture_like):
    small = PairTask("small", [Pair(k, v) for k, v in zip("abcde", "fghij")], template=Template(demo_sep=" ; "))
    with pytest.raises(TaskError, match="shots=5 needs more pairs than available.*at most 4 shots from 5 pairs"):
        build_prompts(fixture_like, small, 5, 2)
    with pytest.raises(PromptTooLongError, match="67-token prompt, longer than the context.*64"):
        build_prompts(fixture_like, get_task("fixture-rule"), 16, 2)
    with pytest.raises(PromptTooLongError):
        build_prompts(fixture_like, get_task("fixture-rule"), 8, 2, repeat=2)
    with pytest.raises(TaskError, match="n must be a positive integer"):
        build_prompts(fixture_like, small, 1, 0)


@pytest.mark.real_model
@pytest.mark.shared
def test_first_token_collisions_dropped_and_counted(aidreams):
    checked = check_task(aidreams, get_task("antonym"))
    assert checked.n_dropped_pairs > 0 and checked.task.size == 67 - checked.n_dropped_pairs
    assert len(set(checked.answer_ids.values())) == len(checked.answer_ids)  # no collision left
    with pytest.raises(TaskError, match="number-successor.*collide at their first token.*aidreams"):
        check_task(aidreams, get_task("number-successor"))


@pytest.mark.real_model
@pytest.mark.shared
def test_answer_token_is_the_first_token_in_context(aidreams):
    ps = build_prompts(aidreams, get_task("word-first-letter"), 3, 10, seed=0)
    for p, toks, a in zip(ps.prompts, ps.tokens, ps.answer_ids):
        full = encode(aidreams, p.text + " " + p.answer)
        assert full[: len(toks)] == list(toks) and full[len(toks)] == int(a)
    assert continuation_ids(aidreams, "cat ->", " dog")[0] != encode(aidreams, " dog")[1]  # dummy-prefix space


@pytest.mark.unit
@given(ex=examples(), seed=st.integers(0, 2**16), r=st.integers(1, 4), frac=st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_manipulations_preserve_what_they_should(ex, seed, r, frac):
    rng = np.random.default_rng(seed)
    perm = permute_demos(ex, rng)
    assert sorted(perm.demos, key=repr) == sorted(ex.demos, key=repr) and perm.query == ex.query
    rep = repeat_demos(ex, r)
    assert rep.demos == ex.demos * r and rep.query == ex.query
    labels = ["a", "b", "c", "zz"]
    flip = flip_labels(ex, frac, labels, rng)
    k = int(round(frac * ex.n_shots))
    assert sum(flip.flipped) == k and flip.query == ex.query
    for old, new, f in zip(ex.demos, flip.demos, flip.flipped):
        assert new.input == old.input
        assert (new.output != old.output and new.output in labels) if f else new == old
    mapping = substitution_map([d.output for d in ex.demos] + [ex.query.output], list("ABCDEFGHIJ"), rng)
    assert len(set(mapping.values())) == len(mapping)  # injective


@pytest.mark.unit
def test_bad_manipulation_arguments():
    ex = FewShot((Pair("a", "b"),), Pair("c", "d"))
    with pytest.raises(TaskError, match="repeat must be"):
        repeat_demos(ex, 0)
    with pytest.raises(TaskError, match="noise fraction"):
        flip_labels(ex, 1.5, ["x", "y"], np.random.default_rng(0))


@pytest.mark.fixture
def test_bpe_answers_carry_their_leading_space(bpe_gpt2):
    tok = bpe_gpt2.tokenizer
    ps = build_prompts(bpe_gpt2, get_task("country-capital"), 3, 10, seed=0)
    for p, a in zip(ps.prompts, ps.answer_ids):
        piece = tok.decode([int(a)])
        assert piece.startswith(" ") and (" " + p.answer).startswith(piece)
        assert p.text.endswith(" ->") and "\n" in p.text
