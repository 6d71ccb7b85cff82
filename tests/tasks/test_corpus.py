"""The synthetic corpus: fixture-task scores equal a direct loop over the corpus."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_circuits.tasks import corpus
from icl_circuits.tasks.prompts import (
    build_prompts,
)
from icl_circuits.tasks.registry import (
    FixtureTask,
)

pytestmark = pytest.mark.fixture


@torch.no_grad()
def test_fixture_scores_equal_the_direct_corpus_loop(fixture_like):
    """fixtures/properties.py measures through this API: same episodes, same logits as encoding the corpus directly."""
    from fixtures import properties
    from icl_circuits.tasks.scoring import score_prompts

    cfg = corpus.CorpusConfig()
    for family, k in (("bound", 8), ("rule", 2), ("recorded", 1)):
        rng = np.random.default_rng(5)
        eps = [corpus.sample_episode(rng, cfg, family, k, noise_rate=0.0) for _ in range(30)]
        ids = torch.tensor([corpus.encode(e.tokens(with_answer=False)) for e in eps])
        answers = torch.tensor([corpus.TOKEN_ID[e.answer] for e in eps])
        logits = fixture_like(ids)[:, -1]
        ranks = (logits > logits.gather(1, answers[:, None])).sum(-1)
        prompts = build_prompts(fixture_like, FixtureTask(family, cfg), k, 30, 5)
        scores = score_prompts(fixture_like, prompts, batch_size=30)
        assert torch.equal(scores.rank, ranks)
        acc = float((logits.argmax(-1) == answers).float().mean())
        assert properties.family_accuracy(fixture_like, cfg, family, k, n=30, seed=5) == acc


@pytest.mark.unit
def test_zipf_knob_skews_the_recorded_maps_and_leaves_the_default_corpus_unchanged():
    """``zipf_exponent = 0`` draws exactly what the corpus drew before the knob (the fixtures' weights depend on
    it); ``a > 0`` makes map ``j`` appear with probability ``(j + 1)^-a / Z`` (Chan et al. 2022)."""
    cfg = corpus.CorpusConfig(n_recorded=4)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert [corpus.recorded_index(rng_a, cfg) for _ in range(50)] == [int(rng_b.integers(4)) for _ in range(50)]

    skew = corpus.CorpusConfig(n_recorded=4, zipf_exponent=1.5)
    w = corpus.recorded_weights(skew)
    assert np.allclose(w, np.array([1, 2**-1.5, 3**-1.5, 4**-1.5]) / sum([1, 2**-1.5, 3**-1.5, 4**-1.5]))
    assert np.allclose(corpus.recorded_weights(cfg), 0.25)
    rng = np.random.default_rng(0)
    counts = np.bincount([corpus.recorded_index(rng, skew) for _ in range(4000)], minlength=4) / 4000
    assert np.abs(counts - w).max() < 0.03 and counts[0] > 2 * counts[1] > counts[3]
    names = [corpus.sample_episode(rng, skew, "recorded", 1).mapping_name for _ in range(400)]
    assert names.count("recorded0") > names.count("recorded3")
