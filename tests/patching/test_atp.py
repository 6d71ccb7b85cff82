"""AtP, the QK fix and GradDrop: checked against TransformerLens, autograd and exact patching."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from icl_circuits import InputError
from icl_circuits.patching.atp import attribution_patch, pearson, spearman
from icl_circuits.patching.exact import activation_patch
from tests.helpers import load_fixture
from tests.patching_models import make_pairs


def ld_fn(answer, contrast, positions):
    rows = torch.arange(answer.shape[0])

    def ld(logits):
        return logits[rows, positions, answer] - logits[rows, positions, contrast]

    return ld


def cache(model, tokens, names):
    out = {}

    def make(name):
        def hook(t, hook):
            out[name] = t.detach().clone()

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, make(n)) for n in names]):
        model(tokens)
    return out


def directional(model, tokens, ld, name, direction):
    """``d LD_b / d t`` at ``t = 0`` with ``name``'s activation replaced by ``act + t_b * direction`` (autograd)."""
    t = torch.zeros(tokens.shape[0], requires_grad=True)

    def hook(act, hook):
        return act + t.reshape(-1, *([1] * (act.ndim - 1))) * direction

    with torch.enable_grad(), model.hooks(fwd_hooks=[(name, hook)]):
        (grad,) = torch.autograd.grad(ld(model(tokens)).sum(), t)
    return grad


@pytest.mark.fixture
@pytest.mark.parametrize("model_name", ["gpt2", "gqa"])
def test_per_position_head_outputs_equal_transformer_lens_node_scores(request, model_name):
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attribution_patch

    model = request.getfixturevalue(model_name)
    clean, corrupted, answer, contrast, _ = make_pairs(11)
    ours = attribution_patch(model, clean, corrupted, answer, contrast, "z", per_position=True, graddrop=False)
    expected = torch.zeros(ours.atp.shape[:-1])
    for b in range(clean.shape[0]):
        a, c = int(answer[b]), int(contrast[b])

        def metric(lg, a=a, c=c):
            return lg[0, -1, a] - lg[0, -1, c]

        res = tl_attribution_patch(model, clean[b : b + 1], corrupted[b : b + 1], metric)
        for node, v in res.node_scores.items():
            if node.kind == "attn_head_out":
                expected[node.layer, node.position, node.head] += v / clean.shape[0]
    assert expected.abs().max() > 1e-2
    torch.testing.assert_close(ours.atp.mean(-1), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.fixture
@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("activation", ["z", "q", "k", "v"])
def test_atp_is_the_directional_derivative_towards_the_source(gqa, activation, direction):
    clean, corrupted, answer, contrast, positions = make_pairs(12)
    ours = attribution_patch(gqa, clean, corrupted, answer, contrast, activation, direction=direction,
                             answer_positions=positions, graddrop=False)  # fmt: skip
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    ld = ld_fn(answer, contrast, positions)
    for layer, head in [(0, 1), (1, 0)]:
        name = f"blocks.{layer}.attn.hook_{activation}"
        delta = torch.zeros_like(cache(gqa, base, [name])[name])
        delta[:, :, head] = (cache(gqa, source, [name])[name] - cache(gqa, base, [name])[name])[:, :, head]
        torch.testing.assert_close(ours.atp[layer, head], directional(gqa, base, ld, name, delta), atol=1e-4, rtol=1e-4)


@pytest.mark.fixture
@pytest.mark.parametrize("model_name", ["gpt2", "gqa"])
def test_qk_fix_linearises_only_after_the_exact_pattern(request, model_name):
    """AtP+QK fix of a query (all positions) and of a key at one position = the derivative of LD along the
    pattern change that an exact forward with that query/key patched produces."""
    model = request.getfixturevalue(model_name)
    clean, corrupted, answer, contrast, positions = make_pairs(13)
    ld = ld_fn(answer, contrast, positions)
    q_all = attribution_patch(model, clean, corrupted, answer, contrast, "q", answer_positions=positions,
                              graddrop=False)  # fmt: skip
    k_pos = attribution_patch(model, clean, corrupted, answer, contrast, "k", per_position=True,
                              answer_positions=positions, graddrop=False, same_layout=True)  # fmt: skip
    layer, head, pos = 1, 1, 5
    pat = f"blocks.{layer}.attn.hook_pattern"
    base_pattern = cache(model, corrupted, [pat])[pat]
    for act, index, estimate in [("q", (slice(None), slice(None), head), q_all.atp_qk[layer, head]),
                                 ("k", (slice(None), pos, head), k_pos.atp_qk[layer, pos, head])]:  # fmt: skip
        name = f"blocks.{layer}.attn.hook_{act}"
        src = cache(model, clean, [name])[name]

        def patch(x, hook, index=index, src=src):
            x = x.clone()
            x[index] = src[index]
            return x

        with torch.no_grad(), model.hooks(fwd_hooks=[(name, patch)]):
            patched_pattern = cache(model, corrupted, [pat])[pat]
        exact = directional(model, corrupted, ld, pat, patched_pattern - base_pattern)
        torch.testing.assert_close(estimate, exact, atol=1e-4, rtol=1e-4)
    # the fix is not the linear estimate: the softmax is not linear at these scales
    assert (q_all.atp_qk - q_all.atp).abs().max() > 1e-3


@pytest.mark.fixture
def test_head_output_split_into_value_and_qk_paths(gpt2):
    clean, corrupted, answer, contrast, positions = make_pairs(14)
    z = attribution_patch(gpt2, clean, corrupted, answer, contrast, "z", answer_positions=positions, graddrop=False)
    v = attribution_patch(gpt2, clean, corrupted, answer, contrast, "v", answer_positions=positions, graddrop=False)
    torch.testing.assert_close(z.atp_qk, z.atp, atol=1e-5, rtol=1e-4)  # value + exact-softmax QK = (z' - z) . g
    torch.testing.assert_close(z.atp_qk - z.qk_term, v.atp, atol=1e-5, rtol=1e-4)  # the value path is AtP on v
    assert z.qk_term.abs().max() > 1e-2


@pytest.mark.fixture
@pytest.mark.parametrize("model_name", ["gpt2", "gqa"])
def test_graddrop_equals_cutting_each_layer_in_the_forward(request, model_name):
    """GradDrop's backward-side zeroing = detaching layer l's attention and MLP writes in the forward,
    with gradients captured by TransformerLens's cache_activation_and_gradient."""
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    model = request.getfixturevalue(model_name)
    clean, corrupted, answer, contrast, positions = make_pairs(15)
    ours = attribution_patch(model, clean, corrupted, answer, contrast, "z", per_position=True,
                             answer_positions=positions, same_layout=True)  # fmt: skip
    ld = ld_fn(answer, contrast, positions)
    n_layers = model.cfg.n_layers
    names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    clean_z, corrupted_z = cache(model, clean, names), cache(model, corrupted, names)
    delta = torch.stack([clean_z[n] - corrupted_z[n] for n in names])
    total = torch.zeros_like(ours.atp_star)
    for cut in range(n_layers):
        detach = [(f"blocks.{cut}.hook_attn_out", lambda x, hook: x.detach()),
                  (f"blocks.{cut}.hook_mlp_out", lambda x, hook: x.detach())]  # fmt: skip
        with model.hooks(fwd_hooks=detach):  # hook_embed upstream of all: the backward reaches every hook_z
            gc = cache_activation_and_gradient(model, corrupted, lambda lg: ld(lg).sum(), ["hook_embed", *names])
        grads = torch.stack([gc.gradients[n] if gc.gradients[n] is not None else 0 * delta[0] for n in names])
        est = (delta * grads).sum(-1)  # [layer, batch, pos, head]
        assert est[cut].abs().max() == 0  # a layer's own write cut: its heads get no gradient
        total += est.abs().permute(0, 2, 3, 1)
    torch.testing.assert_close(ours.atp_star, total / (n_layers - 1), atol=1e-4, rtol=1e-4)


@pytest.mark.unit
def test_correlations_match_scipy():

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, generator=g, dtype=torch.float64)
    y = x + 0.5 * torch.randn(50, generator=g, dtype=torch.float64)
    y[:10] = y[0]  # ties
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x.numpy(), y.numpy())[0], abs=1e-9)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x.numpy(), y.numpy())[0], abs=1e-9)
    with pytest.raises(InputError, match="equal-length"):
        pearson(x, y[:3])


@pytest.mark.fixture
def test_agreement_and_estimates_follow_the_exact_grid(gpt2):
    clean, corrupted, answer, contrast, positions = make_pairs(16)
    exact = activation_patch(gpt2, clean, corrupted, answer, contrast, "z", answer_positions=positions, progress=False)
    est = attribution_patch(gpt2, clean, corrupted, answer, contrast, "z", answer_positions=positions)
    agree = est.agreement(exact)
    assert set(agree.pearson) == {"atp", "atp_qk", "atp_star"} and agree.n_cells == exact.mean().numel()
    x, y = est.normalised("atp").flatten().numpy(), exact.effect().flatten().numpy()
    assert agree.pearson["atp"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-6)
    torch.testing.assert_close(est.estimate("atp").effect(), est.normalised("atp"))
    df = est.to_dataframe()
    assert list(df.columns) == ["layer", "head", "atp", "atp_qk", "atp_star", "qk_term"]
    with pytest.raises(InputError, match="does not match"):
        est.agreement(activation_patch(gpt2, clean, corrupted, answer, contrast, "v", progress=False))
    with pytest.raises(InputError, match="signed estimators"):
        est.estimate("atp_star")
    with pytest.raises(InputError, match="activation must be"):
        attribution_patch(gpt2, clean, corrupted, answer, contrast, "resid_pre")


@pytest.mark.fixture
def test_no_parameter_gradients_or_hooks_left(gqa):
    clean, corrupted, answer, contrast, _ = make_pairs(17)
    before = [p.requires_grad for p in gqa.parameters()]
    assert any(before)  # else the check below could not fail
    attribution_patch(gqa, clean, corrupted, answer, contrast, "k", per_position=True)
    assert all(p.grad is None for p in gqa.parameters())
    assert [p.requires_grad for p in gqa.parameters()] == before  # switched off during the passes, restored
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in gqa.hook_dict.values())


@pytest.mark.fixture
def test_atp_star_tracks_exact_head_patching_on_bound_task():
    from icl_circuits.tasks.pairs import patching_batch
    from icl_circuits.tasks.registry import get_task

    model = load_fixture("icl-tiny")
    pairs = patching_batch(model, get_task("fixture-bound", model), 8, 32, 0, corruption="shuffled_labels")
    args = (model, pairs.clean_tokens, pairs.corrupted_tokens, pairs.answer_tokens, pairs.contrast_tokens, "z")
    exact = activation_patch(*args, answer_positions=pairs.last_positions, progress=False)
    gap = float((exact.clean_logit_diff - exact.corrupted_logit_diff).mean())
    # the fixture does the bound task (a regression here fails, it does not skip): otherwise nothing to attribute
    assert gap >= 1.0, f"fixture:icl-tiny does not do the bound task (clean - corrupted logit difference {gap:.3f})"
    est = attribution_patch(*args, answer_positions=pairs.last_positions)
    agree = est.agreement(exact)
    assert agree.pearson["atp_star"] >= 0.9, agree.to_dataframe().to_string()


@pytest.mark.fixture
def test_an_unreproduced_unembedding_falls_back_to_the_full_logits(gqa, monkeypatch):
    """The forwards read the logit difference from the answer positions only (the sliced unembedding, then
    ``ln_final . W_U``); where ``W_U`` alone does not reproduce the model's logits (here: a soft-cap the config
    claims and the model does not apply) AtP says so and takes the full logits, with the same numbers."""
    clean, corrupted, answer, contrast, positions = make_pairs(18)
    args = (gqa, clean, corrupted, answer, contrast, "z")
    plain = attribution_patch(*args, answer_positions=positions, graddrop=False)
    assert not plain.notes
    monkeypatch.setattr(gqa.cfg, "output_logits_soft_cap", 0.5, raising=False)
    fallback = attribution_patch(*args, answer_positions=positions, graddrop=False)
    assert any("unembedding transform" in n for n in fallback.notes), fallback.notes
    ld = ld_fn(answer, contrast, positions)
    with torch.no_grad():
        torch.testing.assert_close(fallback.corrupted_logit_diff, ld(gqa(corrupted)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fallback.atp, plain.atp, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fallback.qk_term, plain.qk_term, atol=1e-5, rtol=1e-4)
