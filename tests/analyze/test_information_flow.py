"""Saliency (Wang et al. 2023) against finite differences; the flow masks."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.analyze.information_flow import flow_masks, flows, saliency


@pytest.mark.fixture
def test_saliency_matches_finite_differences(fixture_like):
    from icl_circuits import load_model

    model = load_model(str(fixture_like[1]), device="cpu", dtype="float64")  # float64: precise differences
    tokens = torch.tensor([[0, 7, 3, 8, 4, 9, 3, 10, 4, 7, 3]])
    answer = torch.tensor([8])
    sal = saliency(model, tokens, answer)
    name = "blocks.0.attn.hook_pattern"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    A = cache[name][0]  # [head, q, k]

    def loss(h, i, j, eps):
        def bump(x, hook):
            x = x.clone()
            x[0, h, i, j] += eps
            return x

        with torch.no_grad(), model.hooks(fwd_hooks=[(name, bump)]):
            return float(-model(tokens)[0, -1].log_softmax(-1)[8])

    for i, j in [(10, 2), (10, 9), (6, 1)]:
        grad = [(loss(h, i, j, 1e-5) - loss(h, i, j, -1e-5)) / 2e-5 for h in range(model.cfg.n_heads)]
        expected = abs(sum(float(A[h, i, j]) * g for h, g in enumerate(grad)))
        assert expected > 1e-7 and sal[0, 0, i, j].item() == pytest.approx(expected, rel=1e-3)
    # in the last layer only the answer row can move the loss
    assert float(sal[0, -1, :-1].abs().max()) == 0.0
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.unit
def test_flow_masks_partition_the_causal_pairs():
    # <bos> k -> v ; k -> v ; q ->   roles: 0 1 2 3 4 1 2 3 4 5 6, then padding
    roles = torch.tensor([[0, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6, -1]])
    last = torch.tensor([10])
    m = flow_masks(roles, last)
    assert int(m["S_pq"].sum()) == 2 and bool(m["S_pq"][0, 10, 3]) and bool(m["S_pq"][0, 10, 7])
    assert int(m["S_wp"].sum()) == 3 + 7  # label at 3 sees 0..2, label at 7 sees 0..6
    union = m["S_wp"].int() + m["S_pq"].int() + m["S_ww"].int()
    strict = torch.tril(torch.ones(12, 12), -1).bool() & (torch.arange(12)[:, None] <= 10)
    assert torch.equal(union[0] == 1, strict) and int(union.max()) == 1
    sal = torch.zeros(1, 1, 12, 12)
    sal[0, 0, 10, 3], sal[0, 0, 10, 7] = 2.0, 4.0
    out = flows(sal, m)
    assert float(out["S_pq"][0, 0]) == pytest.approx(3.0) and float(out["S_wp"][0, 0]) == 0.0
