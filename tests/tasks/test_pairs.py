"""Clean/corrupted pairs for patching: aligned, differing only where said."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_circuits import TaskError, TokenizationError
from icl_circuits.tasks import corpus
from icl_circuits.tasks.pairs import CORRUPTIONS, patching_batch
from icl_circuits.tasks.registry import (
    FixtureTask,
    Pair,
    PairTask,
    Template,
    get_task,
)


@pytest.mark.fixture
@given(seed=st.integers(0, 2**16), shots=st.integers(1, 10), corruption=st.sampled_from(CORRUPTIONS),
       family=st.sampled_from(corpus.FAMILIES))  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_patching_pairs_align_and_differ_only_where_said(fixture_like, seed, shots, corruption, family):
    shots = max(shots, 2) if corruption == "shuffled_labels" else shots
    pb = patching_batch(fixture_like, FixtureTask(family), shots, 4, seed, corruption=corruption)
    assert pb.clean_tokens.shape == pb.corrupted_tokens.shape == pb.changeable.shape
    n_pos = 1 + 4 * shots + 2
    assert pb.clean_tokens.shape[1] == n_pos and (pb.last_positions == n_pos - 1).all()
    label_pos = torch.zeros(n_pos, dtype=torch.bool)
    label_pos[3 : 4 * shots : 4] = True  # <bos> k -> v ; ...
    demo_block = torch.zeros(n_pos, dtype=torch.bool)
    demo_block[1 : 1 + 4 * shots] = True
    expected = demo_block if corruption == "filler" else label_pos
    assert (pb.changeable == expected).all()
    diff = pb.clean_tokens != pb.corrupted_tokens
    assert not (diff & ~pb.changeable).any() and diff.any(dim=1).all()
    assert (pb.answer_tokens != pb.contrast_tokens).all()
    for clean, bad in zip(pb.clean_tokens, pb.corrupted_tokens):
        if corruption == "shuffled_labels":
            assert sorted(clean[label_pos].tolist()) == sorted(bad[label_pos].tolist())
        if corruption == "filler":
            assert (bad[demo_block] == corpus.TOKEN_ID[corpus.UNK]).all()


@pytest.mark.fixture
def test_shuffled_bound_contrast_is_the_corrupted_answer(fixture_like):
    pb = patching_batch(fixture_like, get_task("fixture-bound"), 6, 8, seed=0)
    for text, bad, c in zip(pb.clean_prompts, pb.corrupted_prompts, pb.contrast_tokens):
        query = text.split()[-2]
        demos = dict(d.split(" -> ") for d in bad.split(" ; ")[:-1])
        assert corpus.TOKEN_ID[demos[query]] == int(c)


@pytest.mark.fixture
def test_patching_errors(fixture_like):
    with pytest.raises(TaskError, match="unknown corruption"):
        patching_batch(fixture_like, get_task("fixture-bound"), 2, 2, corruption="noise")
    with pytest.raises(TaskError, match="needs n_shots >= 1"):
        patching_batch(fixture_like, get_task("fixture-bound"), 0, 2)
    with pytest.raises(TaskError, match="needs n_shots >= 2"):
        patching_batch(fixture_like, get_task("fixture-bound"), 1, 2)
    with pytest.raises(TaskError, match="needs other_task="):
        patching_batch(fixture_like, get_task("antonym"), 2, 2, corruption="other_task_labels")
    same = PairTask("same", [Pair(k, "a") for k in "bcdefg"], template=Template(demo_sep=" ; "))
    with pytest.raises(TaskError, match="'same' has 1 distinct label"):
        patching_batch(fixture_like, same, 3, 2)
    rec = get_task("fixture-recorded0")
    with pytest.raises(TaskError, match="20 examples in a row left unchanged by 'other_task_labels'"):
        patching_batch(fixture_like, rec, 3, 2, corruption="other_task_labels", other_task=rec)


@pytest.mark.real_model
@pytest.mark.shared
def test_patching_with_subword_tokenizer(aidreams):
    task = get_task("word-first-letter")
    for corruption in ("shuffled_labels", "filler"):
        pb = patching_batch(aidreams, task, 4, 6, seed=1, corruption=corruption)
        diff = pb.clean_tokens != pb.corrupted_tokens
        assert not (diff & ~pb.changeable).any() and diff.any(dim=1).all()
    with pytest.raises(TokenizationError, match="filler 'xylophone' is .* tokens; it must be one"):
        patching_batch(aidreams, task, 2, 2, corruption="filler", template=Template(filler="xylophone"))
    other = PairTask("long", [Pair(k, "xylophone") for k in ("p", "q", "r")])
    with pytest.raises(TokenizationError, match="no label of 1 token"):
        patching_batch(aidreams, task, 2, 2, corruption="other_task_labels", other_task=other)


@pytest.mark.fixture
def test_bpe_patching_with_multi_token_labels(bpe_gpt2):
    for corruption in CORRUPTIONS:
        other = get_task("antonym") if corruption == "other_task_labels" else None
        pb = patching_batch(bpe_gpt2, get_task("present-past"), 4, 6, seed=2, corruption=corruption, other_task=other)
        diff = pb.clean_tokens != pb.corrupted_tokens
        assert not (diff & ~pb.changeable).any() and diff.any(dim=1).all()
        for clean, bad, last in zip(pb.clean_tokens, pb.corrupted_tokens, pb.last_positions):
            assert (clean[last + 1 :] == bad[last + 1 :]).all()  # padding identical
