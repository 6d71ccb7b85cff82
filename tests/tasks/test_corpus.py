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
