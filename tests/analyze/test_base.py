"""Shared readouts of the analyses against the project's scoring and TransformerLens."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.analyze.base import head_logit_attribution, uses_corpus_vocab
from icl_circuits.tasks.prompts import build_prompts
from icl_circuits.tasks.scoring import answer_logits, label_log_probs, score_prompts, scores_from_logits


@pytest.mark.fixture
def test_answer_logits_give_the_scores_of_score_prompts(tiny_gpt2, word_task):
    ps = build_prompts(tiny_gpt2, word_task, 3, 10, seed=0)
    assert len({len(t) for t in ps.tokens}) > 1  # ragged: padding happens
    ours = scores_from_logits(answer_logits(tiny_gpt2, ps.tokens, batch_size=3), ps.answer_ids, ps.contrast_ids)
    ref = score_prompts(tiny_gpt2, ps)
    assert torch.equal(ours.correct, ref.correct) and torch.equal(ours.rank, ref.rank)
    assert torch.allclose(ours.logit_diff, ref.logit_diff, atol=1e-4)
    assert torch.allclose(ours.prob, ref.prob, atol=1e-6)


@pytest.mark.unit
def test_label_log_probs_renormalise_over_the_labels():
    final = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 5, 7])
    lq = label_log_probs(final, labels)
    assert torch.allclose(lq.exp().sum(-1), torch.ones(3))
    # label log-prob differences are logit differences (the calibration identity relies on it)
    assert torch.allclose(lq[:, 0] - lq[:, 1], final[:, 2] - final[:, 5], atol=1e-5)


@pytest.mark.fixture
@pytest.mark.parametrize("which", ["tiny_gpt2", "fixture_like"])
def test_head_attribution_equals_transformer_lens_stacked_head_results(which, request):
    model = request.getfixturevalue(which)
    model = model[0] if isinstance(model, tuple) else model
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 40, (4, 9), generator=g)
    answers, contrasts = torch.randint(3, 40, (4,), generator=g), torch.randint(3, 40, (4,), generator=g)
    ours = head_logit_attribution(model, tokens, answers, contrasts, batch_size=3)  # [batch, L, H]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        stacked = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [L*H, batch, d_model]
    W_U = model.W_U.detach()
    ref = torch.einsum("kbd,db->bk", stacked, W_U[:, answers] - W_U[:, contrasts]).reshape(ours.shape)
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())


@pytest.mark.fixture
def test_uses_corpus_vocab(fixture_like, tiny_gpt2):
    assert uses_corpus_vocab(fixture_like[0]) and not uses_corpus_vocab(tiny_gpt2)
