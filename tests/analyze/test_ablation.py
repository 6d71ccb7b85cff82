"""Mean ablation of heads (analyze.ablation) against TransformerLens patching and plain runs."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import InputError
from icl_circuits.analyze.ablation import ablated_logits, head_ablation_effects, mean_z
from icl_circuits.analyze.base import (
    answer_logits,
)
from icl_circuits.tasks.prompts import build_prompts
from icl_circuits.tasks.registry import FixtureTask

pytestmark = pytest.mark.fixture


def test_single_head_mean_ablation_equals_transformer_lens_patching(fixture_like):
    import pandas as pd
    from transformer_lens import ActivationCache, patching

    model, _ = fixture_like
    tokens = torch.randint(5, 31, (6, 11), generator=torch.Generator().manual_seed(2))
    answers, contrasts = tokens[:, 1], tokens[:, 2]
    rows = torch.arange(6)
    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    means = ActivationCache({n: cache[n].mean(0, keepdim=True).expand_as(cache[n]).clone() for n in names}, model)

    def metric(logits):
        return (logits[rows, -1, answers] - logits[rows, -1, contrasts]).mean()

    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    with torch.no_grad():
        setter, index = patching.layer_head_vector_patch_setter, pd.DataFrame(heads, columns=["layer", "head"])
        theirs = patching.generic_activation_patch(model, tokens, means, metric, setter, "z", index_df=index)
        clean = float(metric(model(tokens)))
    ours = head_ablation_effects(model, tokens, answers, contrasts, batch_size=4)
    assert torch.allclose(ours.flatten(), theirs.float() - clean, atol=1e-4)
    assert float(ours.abs().max()) > 1e-4  # the ablations really change something


def test_ablation_sweep_full_forward_fallback_agrees(fixture_like, monkeypatch):
    """Ragged prompts; the resumed sweep and the one-full-forward-per-head fallback give the same effects."""
    from icl_circuits.patching.resume import BaseRun

    model, _ = fixture_like
    ps = build_prompts(model, FixtureTask("bound"), 3, 5, seed=0)
    ragged = [list(t) for t in ps.tokens]
    ragged[0] = ragged[0][:-4] + ragged[0][-2:]  # one prompt a demo shorter: right padding happens
    heads = [(0, 1), (1, 0), (1, 3)]
    fast = head_ablation_effects(model, ragged, ps.answer_ids, ps.contrast_ids, heads=heads, max_rows=10)

    def unsupported(self, atol=1e-4):
        raise InputError("pretend the blocks cannot be resumed")

    monkeypatch.setattr(BaseRun, "check", unsupported)
    slow = head_ablation_effects(model, ragged, ps.answer_ids, ps.contrast_ids, heads=heads, batch_size=2)
    assert torch.allclose(fast, slow, atol=1e-4) and float(fast.abs().sum()) > 0
    assert float(fast[0, 0]) == 0.0  # not in the sweep


def test_ablation_means_skip_padding_and_hooks_are_removed(fixture_like):
    model, _ = fixture_like
    short, long = [0, 7, 3, 8, 4, 9, 3], [0, 7, 3, 8, 4, 10, 3, 11, 4, 12, 3]
    means = mean_z(model, [short, long], batch_size=1)
    _, cache = model.run_with_cache(torch.tensor([long]))
    # beyond the short prompt only the long one counts; before it, the average of both
    assert torch.allclose(means[0][8], cache["blocks.0.attn.hook_z"][0, 8], atol=1e-6)
    _, c_short = model.run_with_cache(torch.tensor([short]))
    both = (cache["blocks.1.attn.hook_z"][0, 2] + c_short["blocks.1.attn.hook_z"][0, 2]) / 2
    assert torch.allclose(means[1][2], both, atol=1e-6)
    before = answer_logits(model, [short, long])
    ablated = ablated_logits(model, [short, long], [(1, 0), (1, 2)])
    assert not torch.allclose(before, ablated)
    assert torch.equal(answer_logits(model, [short, long]), before)  # hooks gone
    with pytest.raises(InputError, match="not in the model"):
        ablated_logits(model, [short], [(5, 0)])
