"""Fast weights: the exact split of head outputs, the dual form and the summary, against TransformerLens caches."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.errors import InputError
from icl_circuits.fast_weights import decompose as fw
from tests.helpers import ARROW, SEP, fixture_tokens


def _reference(model, tokens, last):
    """TransformerLens's own per-head outputs at the query: hook_z @ W_O, and hook_attn_out."""
    _, cache = model.run_with_cache(tokens)
    rows = torch.arange(tokens.shape[0])
    z = torch.stack([cache[f"blocks.{l}.attn.hook_z"][rows, last] for l in range(model.cfg.n_layers)], 1)
    head_out = torch.einsum("blhe,lhed->blhd", z, model.W_O.detach()).flatten(1, 2)
    attn_out = torch.stack([cache[f"blocks.{l}.hook_attn_out"][rows, last] for l in range(model.cfg.n_layers)], 1)
    return cache, head_out, attn_out


@pytest.mark.unit
def test_effective_rank_analytic():
    pr, r90 = fw.effective_rank(torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [2.0, 1.0, 0.0, 0.0]]))
    assert pr.tolist() == pytest.approx([3.0, 1.0, 25.0 / 17.0])
    assert r90.tolist() == [3, 1, 2]  # [2, 1]: the first holds 4/5 < 90% of the energy
    pr0, r0 = fw.effective_rank(torch.zeros(1, 3))
    assert float(pr0) == 0.0 and int(r0) == 0
    with pytest.raises(InputError, match="energy"):
        fw.effective_rank(torch.ones(3), energy=0.0)


@pytest.mark.unit
def test_reconstruction_analytic():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, 8, generator=g)
    assert fw.reconstruction(t, 3.0 * t) == pytest.approx((1.0, 1.0))
    # the scalar fit absorbs the sign, the cosine does not
    assert fw.reconstruction(t, -t) == pytest.approx((-1.0, 1.0))
    ortho = torch.stack([t[:, 1], -t[:, 0], *t[:, 2:].T * 0], dim=1)  # rows orthogonal to t's first two coordinates
    cos, ev = fw.reconstruction(t[:, :2], ortho[:, :2])
    assert cos == pytest.approx(0.0, abs=1e-9) and ev <= 0.0
    with pytest.raises(InputError):
        fw.reconstruction(t, t[:, :4])


@pytest.mark.fixture
def test_parse_heads(fixture_shaped):
    assert fw.parse_heads("1.2, 0.0,1.2", fixture_shaped) == [(1, 2), (0, 0)]
    assert len(fw.parse_heads(None, fixture_shaped)) == 8
    for bad in ("1-2", "2.0", "0.4", ""):
        with pytest.raises(InputError):
            fw.parse_heads(bad, fixture_shaped)


@pytest.mark.fixture
@pytest.mark.parametrize(
    "which",
    ["fixture_shaped", "tiny_gpt2", "gqa_llama", pytest.param("aidreams", marks=[pytest.mark.real_model, pytest.mark.shared])],  # noqa: E501
)
def test_parts_add_up_to_the_head_output(which, request):
    model = request.getfixturevalue(which)
    vocab = (5, 31) if which != "tiny_gpt2" else (5, 40)
    tokens = fixture_tokens(4, 3, seed=0, vocab=vocab)
    before = tokens.clone()
    roles = fw.roles_from_tokens(tokens, arrow_id=ARROW, sep_id=SEP)
    dec = fw.decompose(model, tokens, roles)
    assert torch.equal(tokens, before)
    cache, head_out, attn_out = _reference(model, tokens, roles.last_positions)
    assert (dec.head_out - head_out).abs().max() < 1e-5
    assert dec.sum_error() < 1e-5
    assert (dec.demo_part + dec.zero_shot_part - dec.head_out).abs().max() < 1e-5
    assert (dec.per_demo.sum(2) - dec.demo_part).abs().max() < 1e-5
    L, H = model.cfg.n_layers, model.cfg.n_heads
    try:
        b_O = model.b_O.detach()
    except AttributeError:  # bias-free checkpoint
        b_O = torch.zeros(L, model.cfg.d_model)
    assert (dec.head_out.reshape(4, L, H, -1).sum(2) + b_O - attn_out).abs().max() < 1e-5
    shares = dec.shares(dec.per_role).sum(-1)
    assert (shares - 1).abs().max() < 1e-4
    # TransformerLens's direct-logit-attribution stack: the head outputs divided by ln_final's scale
    stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [head, batch, d_model]
    assert (stack.transpose(0, 1) - dec.head_out / dec.final_scale[:, None, None]).abs().max() < 1e-5


@pytest.mark.fixture
@pytest.mark.parametrize("which", ["fixture_shaped", "gqa_llama"])
def test_dual_form_uses_the_models_own_scores(which, request):
    """dW_lin q~ = sum over demo positions of the model's pre-softmax score times (hook_v @ W_O)."""
    model = request.getfixturevalue(which)
    tokens = fixture_tokens(3, 4, seed=2)
    roles = fw.roles_from_tokens(tokens, arrow_id=ARROW, sep_id=SEP)
    dec = fw.decompose(model, tokens, roles)
    _, cache = model.run_with_cache(tokens)
    demo = (roles.demo_index >= 0).float()
    n_heads = model.cfg.n_heads
    for i, (l, h) in enumerate(dec.heads):
        v = cache[f"blocks.{l}.attn.hook_v"]
        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)[:, :, h]  # [batch, pos, d_head]
        u = v @ model.W_O[l, h].detach()
        scores = cache[f"blocks.{l}.attn.hook_attn_scores"][:, h, -1]  # [batch, pos]
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][:, h, -1]
        expected_lin = torch.einsum("bs,bsd->bd", scores * demo, u)
        expected_soft = torch.einsum("bs,bsd->bd", scores * pattern * demo, u)
        assert (dec.fw_lin_query[:, i] - expected_lin).abs().max() < 1e-4
        assert (dec.fw_soft_query[:, i] - expected_soft).abs().max() < 1e-4
        assert (dec.demo_attention[:, i] - (pattern * demo).sum(-1)).abs().max() < 1e-6
        assert torch.linalg.matrix_rank(dec.fw_lin[0, i]) <= min(int(demo[0].sum()), model.cfg.d_head)


@pytest.mark.fixture
def test_right_padding_equals_unpadded(fixture_shaped):
    a, b = fixture_tokens(1, 2, seed=3), fixture_tokens(1, 4, seed=4)
    padded = torch.full((2, b.shape[1]), 1)
    padded[0, : a.shape[1]], padded[1] = a[0], b[0]
    roles = fw.roles_from_tokens(
        padded, arrow_id=ARROW, sep_id=SEP, last_positions=torch.tensor([a.shape[1] - 1, b.shape[1] - 1])
    )
    dec = fw.decompose(fixture_shaped, padded, roles)
    alone = fw.decompose(fixture_shaped, a, fw.roles_from_tokens(a, arrow_id=ARROW, sep_id=SEP))
    assert (dec.head_out[0] - alone.head_out[0]).abs().max() < 1e-5
    assert (dec.per_demo[0, :, :2] - alone.per_demo[0]).abs().max() < 1e-5
    assert dec.per_demo[0, :, 2:].abs().max() == 0  # prompt 0 has no demos 2 and 3


@pytest.mark.fixture
def test_summary_readout_and_plots(fixture_shaped):
    import plotly.graph_objects as go

    tokens = fixture_tokens(6, 3, seed=5)
    roles = fw.roles_from_tokens(tokens, arrow_id=ARROW, sep_id=SEP)
    dec = fw.decompose(fixture_shaped, tokens, roles, [(1, 0), (0, 2)])
    answers = tokens[:, 3]  # any token ids: the readout is checked against its definition
    res = fw.summarize(fixture_shaped, dec, answers)
    W_U = fixture_shaped.W_U.detach()
    expected = ((dec.demo_part[:, 0] / dec.final_scale[:, None]) @ W_U).gather(1, answers[:, None]).mean()
    assert res.rows[0]["answer_dla"] == pytest.approx(float(expected), rel=1e-4, abs=1e-7)
    assert res.heads == ((1, 0), (0, 2)) and len(res.rows[0]["singular_values"]) == 8
    tv = fw.task_vector(dec, [(0, 2)])
    assert torch.allclose(tv, dec.demo_part[:, 1].mean(0))
    figs = res.figures()
    assert len(figs) == 3 and all(isinstance(f, go.Figure) for f in figs)
    assert "Fast weights" in res._repr_html_() and set(res.to_dataframe()["layer"]) == {0, 1}
    with pytest.raises(InputError):
        fw.summarize(fixture_shaped, dec, answers[:2])
    with pytest.raises(InputError, match="not decomposed"):
        fw.task_vector(dec, [(1, 1)])


@pytest.mark.fixture
def test_factored_fast_weights_match_the_full_matrices(fixture_shaped, tiny_gpt2):
    """hook_v = ln1.hook_normalized @ W_V + b_V (the docstring's identity); the spectrum and norms from the
    factored form equal torch's SVD of the full dW = W_O^T M."""
    tokens = fixture_tokens(3, 4, seed=8)
    roles = fw.roles_from_tokens(tokens, arrow_id=ARROW, sep_id=SEP)
    dec = fw.decompose(fixture_shaped, tokens, roles)
    for kind, full in (("lin", dec.fw_lin), ("soft", dec.fw_soft)):
        sv = torch.linalg.svdvals(full.double())
        assert (dec.singular_values(kind).double() - sv).abs().max() < 1e-5 * float(sv.max())
        iso = dec.fw_isometric(kind)
        assert torch.allclose(iso.flatten(2).norm(dim=-1), full.flatten(2).norm(dim=-1), rtol=1e-4)
    _, cache = tiny_gpt2.run_with_cache(fixture_tokens(2, 2, seed=9, vocab=(5, 40)))
    for l in range(tiny_gpt2.cfg.n_layers):
        x = cache[f"blocks.{l}.ln1.hook_normalized"]
        v = torch.einsum("bpd,hde->bphe", x, tiny_gpt2.W_V[l].detach()) + tiny_gpt2.b_V[l].detach()
        assert (v - cache[f"blocks.{l}.attn.hook_v"]).abs().max() < 1e-5
