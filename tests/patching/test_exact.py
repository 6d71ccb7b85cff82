"""Exact activation patching against TransformerLens's patching sweeps; effects, bootstrap, tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import patching as tlp

from icl_circuits import InputError
from icl_circuits.patching.exact import PatchEffects, activation_patch
from tests.patching_models import make_pairs

TL_SWEEPS = {
    ("z", False): tlp.get_act_patch_attn_head_out_all_pos,
    ("z", True): tlp.get_act_patch_attn_head_out_by_pos,
    ("q", False): tlp.get_act_patch_attn_head_q_all_pos,
    ("k", False): tlp.get_act_patch_attn_head_k_all_pos,
    ("v", False): tlp.get_act_patch_attn_head_v_all_pos,
    ("pattern", False): tlp.get_act_patch_attn_head_pattern_all_pos,
    ("q", True): tlp.get_act_patch_attn_head_q_by_pos,
    ("k", True): tlp.get_act_patch_attn_head_k_by_pos,
    ("v", True): tlp.get_act_patch_attn_head_v_by_pos,
    ("pattern", True): tlp.get_act_patch_attn_head_pattern_by_pos,
    ("resid_pre", True): tlp.get_act_patch_resid_pre,
}


def theirs(model, clean, corrupted, answer, contrast, positions, activation, per_position, direction):
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    rows = torch.arange(clean.shape[0])

    def metric(logits):
        return logits[rows, positions, answer] - logits[rows, positions, contrast]

    with torch.no_grad():
        _, cache = model.run_with_cache(source)
        values = TL_SWEEPS[(activation, per_position)](model, base, cache, metric, reduce="none").values
    if activation == "pattern" and per_position:  # TransformerLens: [layer, head, dest_pos, batch]
        values = values.permute(0, 2, 1, 3)
    return values


def _effects(direction="denoising", seed=0, batch=6):
    g = torch.Generator().manual_seed(seed)
    clean = 2.0 + torch.rand(batch, generator=g)
    corrupted = -1.0 + torch.rand(batch, generator=g)
    patched = torch.randn(2, 3, batch, generator=g)
    return PatchEffects("z", direction, ("layer", "head"), patched, clean, corrupted)


@pytest.mark.fixture
@pytest.mark.parametrize("direction", ["denoising", "noising"])
@pytest.mark.parametrize("activation,per_position", list(TL_SWEEPS))
@pytest.mark.parametrize("model_name", ["gpt2", "gqa"])
def test_same_numbers_as_transformer_lens(request, model_name, activation, per_position, direction):
    model = request.getfixturevalue(model_name)
    clean, corrupted, answer, contrast, positions = make_pairs(1)
    ours = activation_patch(model, clean, corrupted, answer, contrast, activation, per_position=per_position,
                            direction=direction, answer_positions=positions, max_rows=8, progress=False,
                            same_layout=True)  # random tokens, ragged answer positions: index p is p everywhere

    expected = theirs(model, clean, corrupted, answer, contrast, positions, activation, per_position, direction)
    assert ours.patched_logit_diff.shape == expected.shape
    torch.testing.assert_close(ours.patched_logit_diff, expected, atol=1e-4, rtol=0)
    # the patches moved the logit difference: the comparison is not between two unpatched runs
    assert (ours.patched_logit_diff - ours.corrupted_logit_diff if direction == "denoising" else
            ours.patched_logit_diff - ours.clean_logit_diff).abs().max() > 1e-3  # fmt: skip


@pytest.mark.real_model
@pytest.mark.shared
@pytest.mark.parametrize("activation,per_position", [("z", False), ("z", True), ("k", False), ("resid_pre", True)])
def test_same_numbers_as_transformer_lens_on_aidreams(aidreams, activation, per_position):
    clean, corrupted, answer, contrast, positions = make_pairs(2, vocab=500)
    for direction in ("denoising", "noising"):
        ours = activation_patch(aidreams, clean, corrupted, answer, contrast, activation, per_position=per_position,
                                direction=direction, answer_positions=positions, progress=False,
                                same_layout=True)  # fmt: skip
        expected = theirs(aidreams, clean, corrupted, answer, contrast, positions, activation, per_position, direction)
        torch.testing.assert_close(ours.patched_logit_diff, expected, atol=1e-4, rtol=0)


@pytest.mark.fixture
def test_inputs_untouched_and_no_hooks_left(gqa):
    clean, corrupted, answer, contrast, positions = make_pairs(5)
    copies = [t.clone() for t in (clean, corrupted, answer, contrast, positions)]
    activation_patch(gqa, clean, corrupted, answer, contrast, "z", answer_positions=positions, progress=False)
    for before, after in zip(copies, (clean, corrupted, answer, contrast, positions)):
        assert torch.equal(before, after)
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in gqa.hook_dict.values())
    assert all(not block._forward_pre_hooks for block in gqa.blocks)


@pytest.mark.fixture
def test_bad_inputs_raise_with_the_reason(tiny_gpt2):
    clean, corrupted, answer, contrast, _ = make_pairs(6)
    cases = [
        ((clean, corrupted[:, :-1], answer, contrast), {}, "same shape"),
        ((clean, corrupted, answer[:2], contrast), {}, "answer_tokens must be"),
        ((clean, corrupted, answer, answer), {}, "equals its contrast"),
        ((clean, corrupted, answer, contrast + 1000), {}, "outside the vocabulary"),
        ((clean, corrupted, answer, contrast), {"direction": "sideways"}, "direction must be"),
        ((clean, corrupted, answer, contrast, "mlp_out"), {}, "activation must be"),
        ((clean, corrupted, answer, contrast, "resid_pre"), {}, "per_position=True"),
        ((clean, corrupted, answer, contrast), {"answer_positions": torch.tensor([0, 1, 99])}, "answer_positions"),
        ((clean.float(), corrupted, answer, contrast), {}, "integer tensor"),
    ]
    for args, kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            activation_patch(tiny_gpt2, *args, progress=False, **kw)
    tiny_gpt2.train()
    try:
        with pytest.raises(InputError, match="training mode"):
            activation_patch(tiny_gpt2, clean, corrupted, answer, contrast, progress=False)
    finally:
        tiny_gpt2.eval()


@pytest.mark.unit
def test_normalisation_per_example_and_batch():
    e = _effects()
    gap = e.clean_logit_diff - e.corrupted_logit_diff
    torch.testing.assert_close(e.per_example(), (e.patched_logit_diff - e.corrupted_logit_diff) / gap)
    torch.testing.assert_close(e.mean(), (e.patched_logit_diff.mean(-1) - e.corrupted_logit_diff.mean()) / gap.mean())
    # the batch value is the gap-weighted mean of the per-example values
    torch.testing.assert_close(e.mean(), (e.per_example() * gap).sum(-1) / gap.sum())
    torch.testing.assert_close(e.effect(), e.mean())
    noising = _effects("noising")
    torch.testing.assert_close(noising.effect(), noising.mean() - 1.0)
    # an unpatched run is 0 (denoising: the corrupted run) or 1 (noising: the clean run)
    unpatched = e.corrupted_logit_diff.expand(2, 3, -1)
    same = PatchEffects("z", "denoising", ("layer", "head"), unpatched, e.clean_logit_diff, e.corrupted_logit_diff)
    torch.testing.assert_close(same.mean(), torch.zeros(2, 3))


@pytest.mark.unit
def test_bootstrap_matches_a_plain_resampling_loop():
    e = _effects(seed=1)
    low, high = e.bootstrap_ci(confidence=0.9, n_resamples=200, seed=7)
    idx = torch.randint(6, (200, 6), generator=torch.Generator().manual_seed(7))
    stats = torch.stack(
        [(e.patched_logit_diff[..., i].mean(-1) - e.corrupted_logit_diff[i].mean())
         / (e.clean_logit_diff[i] - e.corrupted_logit_diff[i]).mean() for i in idx], dim=-1
    )  # fmt: skip
    torch.testing.assert_close(low, torch.quantile(stats, 0.05, dim=-1))
    torch.testing.assert_close(high, torch.quantile(stats, 0.95, dim=-1))
    assert torch.equal(e.bootstrap_ci(seed=3)[0], e.bootstrap_ci(seed=3)[0])
    constant = PatchEffects("z", "denoising", ("layer", "head"), torch.ones(2, 3, 5), torch.full((5,), 2.0),
                            torch.zeros(5))  # fmt: skip
    lo, hi = constant.bootstrap_ci()
    torch.testing.assert_close(lo, torch.full((2, 3), 0.5))
    torch.testing.assert_close(hi, torch.full((2, 3), 0.5))


@pytest.mark.unit
def test_dataframe_plot_and_html_show_the_numbers():
    e = _effects(seed=2)
    df = e.to_dataframe()
    assert list(df.columns) == ["layer", "head", "mean", "effect", "ci_low", "ci_high"]
    np.testing.assert_allclose(df["mean"].to_numpy(), e.mean().reshape(-1).numpy(), rtol=1e-6)
    assert (df["ci_low"] <= df["ci_high"]).all()
    long = e.to_dataframe(per_example=True)
    assert len(long) == 2 * 3 * 6
    np.testing.assert_allclose(long["normalised"].to_numpy(), e.per_example().reshape(-1).numpy(), rtol=1e-6)
    fig = e.plot()
    np.testing.assert_allclose(np.asarray(fig.data[0].z), e.effect().numpy(), rtol=1e-6)
    assert list(fig.data[0].x) == [f"H{h}" for h in range(3)] and list(fig.data[0].y) == ["L0", "L1"]
    assert fig.layout.xaxis.type == "category" and "L" in e.summary() and "(0, " not in e.summary()
    assert "icl-table" in e._repr_html_()


@pytest.mark.fixture
def test_per_position_results_refuse_prompts_of_different_lengths(gpt2):
    """Ragged prompts (right-padded, answer positions 8 and 7): index p means different pieces of different
    prompts, so per-position patching and AtP refuse unless aligned by role or declared aligned."""
    from icl_circuits.patching.atp import attribution_patch

    clean, corrupted, answer, contrast, positions = make_pairs(7)
    for fn in (activation_patch, attribution_patch):
        with pytest.raises(InputError, match="differ in token length.*roles="):
            fn(gpt2, clean, corrupted, answer, contrast, "z", per_position=True, answer_positions=positions)
    whole = activation_patch(gpt2, clean, corrupted, answer, contrast, "z", answer_positions=positions, progress=False)
    assert whole.axis_names == ("layer", "head")  # all positions at once: no position index to misalign


def _mixed_batch(model):
    """english-french pairs on a real tokenizer: words of 1-4 tokens, prompts of different lengths."""
    from icl_circuits.tasks.pairs import patching_batch
    from icl_circuits.tasks.prompts import continuation_ids
    from icl_circuits.tasks.registry import get_task
    from icl_circuits.tasks.roles import roles_from_tokens

    task = get_task("english-french", model)
    b = patching_batch(model, task, 3, 4, seed=0)
    tpl = task.template
    roles = roles_from_tokens(b.clean_tokens, arrow_id=continuation_ids(model, "x", tpl.io_sep.rstrip()),
                              sep_id=continuation_ids(model, "x", tpl.demo_sep), last_positions=b.last_positions,
                              prefix_len=1)  # fmt: skip
    return b, roles


@pytest.mark.real_model
@pytest.mark.shared
def test_patching_by_role_on_prompts_of_mixed_token_lengths(aidreams):
    """Exact patching of the residual stream and of head outputs by role slot equals a plain-hook forward that
    copies the clean activation at that slot's positions of each prompt; AtP by role is its positions' sum."""
    from icl_circuits.patching.atp import attribution_patch
    from icl_circuits.tasks.roles import role_slots

    b, roles = _mixed_batch(aidreams)
    slots = role_slots(roles)
    counts = torch.stack([slots.mask(s).sum(1) for s in range(len(slots))])  # [slot, batch] tokens per piece
    assert len(set(b.last_positions.tolist())) > 1 and bool((counts != counts[:, :1]).any())  # mixed layouts
    args = (aidreams, b.clean_tokens, b.corrupted_tokens, b.answer_tokens, b.contrast_tokens)
    with pytest.raises(InputError, match="differ in token length"):  # position index p: refused
        activation_patch(*args, "resid_pre", per_position=True, answer_positions=b.last_positions, progress=False)
    rows = torch.arange(len(b))
    with torch.no_grad():
        _, cache = aidreams.run_with_cache(b.clean_tokens, names_filter=lambda n: n.endswith(("resid_pre", "hook_z")))

    def ld(name, mask):  # [batch]: the corrupted run with the clean activation at mask [batch, pos(, head)]
        def hook(t, hook):
            m = mask.reshape(*mask.shape, *([1] * (t.ndim - mask.ndim)))
            return torch.where(m, cache[name], t)

        with torch.no_grad():
            logits = aidreams.run_with_hooks(b.corrupted_tokens, fwd_hooks=[(name, hook)])
        return logits[rows, b.last_positions, b.answer_tokens] - logits[rows, b.last_positions, b.contrast_tokens]

    resid = activation_patch(*args, "resid_pre", per_position=True, answer_positions=b.last_positions, roles=roles,
                             progress=False)  # fmt: skip
    assert resid.axis_names == ("layer", "role") and resid.labels == slots.names
    want = torch.stack([torch.stack([ld(f"blocks.{l}.hook_resid_pre", slots.mask(s)) for s in range(len(slots))])
                        for l in range(aidreams.cfg.n_layers)])  # fmt: skip
    torch.testing.assert_close(resid.patched_logit_diff, want.float(), atol=1e-4, rtol=0)
    assert set(resid.to_dataframe()["slot"]) == set(slots.names)
    z = activation_patch(*args, "z", per_position=True, answer_positions=b.last_positions, roles=slots, progress=False)
    head = torch.arange(aidreams.cfg.n_heads)
    for l, h in ((1, 2), (3, 0)):
        want = torch.stack([ld(f"blocks.{l}.attn.hook_z", slots.mask(s)[:, :, None] & (head == h))
                            for s in range(len(slots))])  # fmt: skip
        torch.testing.assert_close(z.patched_logit_diff[l, :, h], want.float(), atol=1e-4, rtol=0)
    atp = attribution_patch(*args, "z", per_position=True, answer_positions=b.last_positions, roles=roles,
                            graddrop=False)  # fmt: skip
    per_pos = attribution_patch(*args, "z", per_position=True, answer_positions=b.last_positions, same_layout=True,
                                graddrop=False)  # [layer, pos, head, batch], checked against TransformerLens elsewhere
    onehot = torch.stack([slots.mask(s) for s in range(len(slots))], -1).float()  # [batch, pos, slot]
    torch.testing.assert_close(atp.atp, torch.einsum("lphb,bps->lshb", per_pos.atp, onehot), atol=1e-5, rtol=0)
    assert atp.axis_names == ("layer", "role", "head") and atp.estimate("atp").labels == slots.names


@pytest.mark.real_model
def test_same_numbers_as_transformer_lens_on_smollm2(smollm2):
    """Every head's output patched exactly on 2 country-capital pairs (4 shots, shuffled-label corruption) equals
    TransformerLens's ``get_act_patch_attn_head_out_all_pos`` to 1e-4, per example. TransformerLens costs one full
    forward per head (270 here); it runs on layers 0, 18 and 29 through ``generic_activation_patch``, the function
    that one is a ``partial`` of (same setter ``layer_head_vector_patch_setter``, same ``hook_z``), with an
    ``index_df`` of those cells. Enough: every layer goes through the same code (resume at the layer from cached
    block inputs), so the first (longest resume), the layer of the induction heads (the largest effects) and
    the last (the shortcut check runs there first) cover what can differ; the fixture tests compare all layers."""
    import pandas as pd

    from icl_circuits.tasks.pairs import patching_batch
    from icl_circuits.tasks.registry import get_task

    b = patching_batch(smollm2, get_task("country-capital", smollm2), 4, 2, seed=0)
    args = (smollm2, b.clean_tokens, b.corrupted_tokens, b.answer_tokens, b.contrast_tokens)
    ours = activation_patch(*args, "z", answer_positions=b.last_positions, progress=False)
    layers, n_heads = (0, 18, 29), int(smollm2.cfg.n_heads)
    rows = torch.arange(2)

    def metric(logits):
        return logits[rows, b.last_positions, b.answer_tokens] - logits[rows, b.last_positions, b.contrast_tokens]

    cells = pd.DataFrame([(l, h) for l in layers for h in range(n_heads)], columns=["layer", "head_index"])
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(b.clean_tokens)
        expected = tlp.generic_activation_patch(smollm2, b.corrupted_tokens, cache, metric,
                                                tlp.layer_head_vector_patch_setter, "z", index_df=cells,
                                                reduce="none").values  # [cells, batch]  # fmt: skip
        clean, corrupted = metric(smollm2(b.clean_tokens)), metric(smollm2(b.corrupted_tokens))
    torch.testing.assert_close(ours.clean_logit_diff, clean, atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.corrupted_logit_diff, corrupted, atol=1e-4, rtol=0)
    got = ours.patched_logit_diff[list(layers)].reshape(len(cells), 2)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (got - ours.corrupted_logit_diff).abs().max() > 0.1  # the patches moved the logit difference
