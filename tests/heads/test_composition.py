"""Weight-based scores (OV copying, Q/K/V composition) against dense products of the weights."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import InputError
from icl_circuits.heads import composition as comp
from icl_circuits.heads import scores as hd


def _dense_composition(model, mode: str) -> torch.Tensor:
    n_heads = model.cfg.n_heads
    W_V = model.W_V.repeat_interleave(n_heads // model.W_V.shape[1], dim=1)
    W_K = model.W_K.repeat_interleave(n_heads // model.W_K.shape[1], dim=1)
    ov = W_V @ model.W_O  # [L, H, d_model, d_model]
    qk = model.W_Q @ W_K.transpose(-2, -1)
    right = {"Q": qk, "K": qk.transpose(-2, -1), "V": ov}[mode]
    L = ov.shape[0]
    out = torch.zeros(L, n_heads, L, n_heads)
    for a in range(L):
        for b in range(a + 1, L):
            prod = ov[a][:, None] @ right[b][None]  # [H_a, H_b, d, d]
            out[a, :, b] = prod.norm(dim=(-2, -1)) / ov[a].norm(dim=(-2, -1))[:, None] / right[b].norm(dim=(-2, -1))
    return out


@pytest.mark.unit
def test_eigenvalue_positivity_of_known_spectra():
    eye = torch.eye(4)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i: neither copies nor suppresses
    assert comp.eigenvalue_positivity(eye).item() == pytest.approx(1.0)
    assert comp.eigenvalue_positivity(-2 * eye).item() == pytest.approx(-1.0)
    assert comp.eigenvalue_positivity(rot).item() == pytest.approx(0.0, abs=1e-7)
    assert comp.eigenvalue_positivity(torch.diag(torch.tensor([3.0, -1.0]))).item() == pytest.approx(0.5)
    assert comp.eigenvalue_positivity(torch.zeros(3, 3)).item() == 0.0


@pytest.mark.unit
def test_composition_baseline_equals_dense_products_of_the_same_draws():
    d_model, d_head, n = 12, 3, 50
    base = comp.composition_baseline(d_model, d_head, "K", n=n, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(n, *s, generator=g, dtype=torch.float64) for s in
             [(d_model, d_head), (d_head, d_model), (d_model, d_head), (d_model, d_head)]]
    ov = draws[0] @ draws[1]
    qk = draws[2] @ draws[3].transpose(-2, -1)
    norm = torch.linalg.matrix_norm
    dense = norm(ov @ qk.transpose(-2, -1)) / norm(ov) / norm(qk)
    assert base.mean == pytest.approx(float(dense.mean()), rel=1e-9)
    assert base.std == pytest.approx(float(dense.std()), rel=1e-9)


@pytest.mark.fixture
@pytest.mark.parametrize("which", ["tiny_gpt2", "gqa_model"])
def test_composition_scores_equal_transformer_lens_and_dense_products(which, request):
    model = request.getfixturevalue(which)
    with torch.no_grad():
        together = comp.all_composition_scores(model)  # the scan's call: the senders' Grams shared by the modes
        for mode in comp.MODES:
            ours = comp.composition_scores(model, mode)
            assert torch.equal(together[mode], ours)
            tl = model.all_composition_scores(mode).scores
            assert torch.allclose(ours, tl, atol=1e-5)
            assert torch.allclose(ours, _dense_composition(model, mode), atol=1e-5)
            assert ours[1:, :, 0].abs().max() == 0 and ours[-1].abs().max() == 0  # only earlier -> later
            assert ours[0, :, 1:].min() > 0


@pytest.mark.fixture
def test_copying_equals_eigenvalues_of_the_dense_full_ov_circuit(tiny_gpt2):
    from transformer_lens import FactoredMatrix

    pool = hd.ordinary_token_ids(tiny_gpt2)
    with torch.no_grad():
        W_E, W_U = tiny_gpt2.W_E[pool].double(), tiny_gpt2.W_U[:, pool].double()
        full = W_E @ tiny_gpt2.W_V.double() @ tiny_gpt2.W_O.double() @ W_U  # [L, H, |S|, |S|]
        dense = comp.eigenvalue_positivity(full)
        ours = comp.copying_scores(tiny_gpt2)
        fm = FactoredMatrix(W_E @ tiny_gpt2.W_V.double(), tiny_gpt2.W_O.double() @ W_U)
        eig = fm.eigenvalues
        tl = (eig.real.sum(-1) / eig.abs().sum(-1)).float()
        assert torch.allclose(ours, dense, atol=1e-5)
        assert torch.allclose(ours, tl, atol=1e-5)
        sampled = comp.copying_scores(tiny_gpt2, n_tokens=20, generator=torch.Generator().manual_seed(5))
        sub = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(5))[:20]]
        full_sub = tiny_gpt2.W_E[sub].double() @ tiny_gpt2.W_V.double() @ tiny_gpt2.W_O.double()
        assert torch.allclose(sampled, comp.eigenvalue_positivity(full_sub @ tiny_gpt2.W_U[:, sub].double()), atol=1e-5)
    with pytest.raises(InputError, match="generator"):
        comp.copying_scores(tiny_gpt2, n_tokens=20)
