"""Per-demo attribution against TransformerLens's logit attribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from icl_circuits import InputError
from icl_circuits.attribution.demos import demo_attribution
from icl_circuits.tasks.prompts import check_task
from icl_circuits.tasks.registry import get_task
from icl_circuits.tasks.roles import ROLE_NAMES, render_examples

pytestmark = pytest.mark.fixture


def _prompts(model, task_name="fixture-bound", shots=4, n=6, seed=0):
    checked = check_task(model, get_task(task_name, model))
    rng = np.random.default_rng(seed)
    examples = [checked.task.draw(rng, shots) for _ in range(n)]
    return (examples, *render_examples(model, checked, examples))


def test_demo_parts_sum_to_transformer_lens_logit_attribution(ind2l):
    _, tokens, roles, answers, contrasts = _prompts(ind2l)
    heads = [(0, 1), (1, 0), (1, 1), (1, 3)]
    da = demo_attribution(ind2l, tokens, answers, contrasts, heads, roles)
    _, cache = ind2l.run_with_cache(tokens)
    stack, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    theirs = cache.logit_attrs(stack, tokens=answers, incorrect_tokens=contrasts, pos_slice=-1)  # [component, batch]
    for i, (l, h) in enumerate(heads):
        torch.testing.assert_close(da.head_dla[i], theirs[labels.index(f"L{l}H{h}")].detach(), atol=1e-5, rtol=1e-4)
    # every position of the prompt belongs to one role: the role sums add up to the head's whole attribution
    torch.testing.assert_close(da.by_role().sum(-1), da.head_dla.mean(-1), atol=1e-5, rtol=1e-4)
    assert da.by_demo().shape == (len(heads), 4) and da.by_role().shape == (len(heads), len(ROLE_NAMES))
    # the norm reading (Kobayashi et al. 2020) is the size of each moved vector, ||A[q, s] v_s W_O||, at the
    # answer position q, and 0 after it; recomputed here from the cache
    rows, last = torch.arange(tokens.shape[0]), roles.last_positions
    after = torch.arange(tokens.shape[1])[None, :] > last[:, None]  # [batch, pos]
    for i, (l, h) in enumerate(heads):
        A = cache[f"blocks.{l}.attn.hook_pattern"][rows, h, last]  # [batch, pos]
        moved = A[..., None] * (cache[f"blocks.{l}.attn.hook_v"][:, :, h] @ ind2l.W_O[l, h])  # [batch, pos, d_model]
        expected = moved.norm(dim=-1).masked_fill(after, 0.0).detach()
        torch.testing.assert_close(da.norm[i], expected, atol=1e-5, rtol=1e-4)


def test_demo_attribution_rejects_bad_input(ind2l):
    _, tokens, roles, answers, contrasts = _prompts(ind2l, n=2)
    with pytest.raises(InputError, match="outside the model"):
        demo_attribution(ind2l, tokens, answers, contrasts, [(2, 0)], roles)
    with pytest.raises(InputError, match=r"\[batch=2\]"):
        demo_attribution(ind2l, tokens, answers[:1], contrasts, [(1, 1)], roles)
    with pytest.raises(InputError, match="heads is empty"):
        demo_attribution(ind2l, tokens, answers, contrasts, [], roles)
