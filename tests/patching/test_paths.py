"""Path patching: the batched two-run algorithm against independent computations and the induction circuit."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from icl_circuits import InputError, load_model
from icl_circuits.heads.scores import ordinary_token_ids, repeated_random_tokens
from icl_circuits.patching.paths import path_patch
from tests.patching_models import make_pairs, random_llama2c

pytestmark = pytest.mark.fixture


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):  # 3 layers, 4 query heads, 2 key/value heads
    return load_model(str(random_llama2c(tmp_path_factory.mktemp("gqa") / "gqa.bin", n_layers=3)), device="cpu")


def _ld(logits, positions, answer, contrast):
    rows = torch.arange(logits.shape[0])
    return logits[rows, positions, answer] - logits[rows, positions, contrast]


def _with_receiver_input(model, tokens, name, head, value, positions, answer, contrast):
    """``LD`` of a full forward of ``tokens`` with ``name``'s head ``head`` replaced by ``value``."""

    def hook(act, hook):
        act = act.clone()
        act[:, :, head] = value
        return act

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, hook)])
    return _ld(logits, positions, answer, contrast)


def _layer_norm(x, eps):
    """LayerNorm without weights (compatibility mode folds them into the next weights)."""
    x = x - x.mean(-1, keepdim=True)
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()


def _receiver_input(model, resid, layer, head, inp):
    """``ln1(resid) @ W_X[layer, head] + b_X[layer, head]``: ``[batch, pos, d_head]``."""
    w = {"q": model.W_Q, "k": model.W_K, "v": model.W_V}[inp][layer, head]
    b = {"q": model.b_Q, "k": model.b_K, "v": model.b_V}[inp][layer, head]
    return _layer_norm(resid, model.cfg.eps) @ w + b


@pytest.mark.parametrize("direction,inp", [("denoising", "q"), ("noising", "k"), ("denoising", "v")])
def test_frozen_mlps_give_the_direct_path_formula(gpt2, direction, inp):
    """freeze_mlps: the receiver reads ln1(resid_pre_base + (z_src - z_base)[sender] @ W_O[sender]) -- every sender."""
    clean, corrupted, answer, contrast, positions = make_pairs(1)
    base, src = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    with torch.no_grad():
        base_logits, cache_b = gpt2.run_with_cache(base)
        _, cache_s = gpt2.run_with_cache(src)
    r_l, r_h = 2, 1
    resid = cache_b[f"blocks.{r_l}.hook_resid_pre"]
    # the weight-free LayerNorm is what the bridge's ln1 computes in compatibility mode
    torch.testing.assert_close(_layer_norm(resid, gpt2.cfg.eps), cache_b[f"blocks.{r_l}.ln1.hook_normalized"])
    ours = path_patch(gpt2, clean, corrupted, answer, contrast, [(r_l, r_h)], inp, direction=direction,
                      answer_positions=positions, freeze_mlps=True, max_rows=6)  # fmt: skip
    assert ours.grid_shape == (r_l, 4) and ours.method == "path"
    base_ld = _ld(base_logits, positions, answer, contrast)
    moved = 0.0
    for s_l in range(r_l):
        name = f"blocks.{s_l}.attn.hook_z"
        for s_h in range(4):
            delta = (cache_s[name] - cache_b[name])[:, :, s_h] @ gpt2.W_O[s_l, s_h]
            value = _receiver_input(gpt2, resid + delta, r_l, r_h, inp)
            expected = _with_receiver_input(gpt2, base, f"blocks.{r_l}.attn.hook_{inp}", r_h, value,
                                            positions, answer, contrast)  # fmt: skip
            torch.testing.assert_close(ours.patched_logit_diff[s_l, s_h], expected, atol=1e-4, rtol=0)
            moved = max(moved, float((expected - base_ld).abs().max()))
    assert moved > 1e-2  # the paths change the logit difference: not a comparison of unpatched runs
    if inp == "k":  # without freezing, layer 0's senders also reach the receiver through the MLPs of layers 0, 1
        free = path_patch(gpt2, clean, corrupted, answer, contrast, [(r_l, r_h)], inp, direction=direction,
                          answer_positions=positions, senders=[(0, h) for h in range(4)])  # fmt: skip
        assert float((free.patched_logit_diff[0] - ours.patched_logit_diff[0]).abs().max()) > 1e-4


def test_adjacent_layers_pass_through_the_senders_own_mlp(gpt2):
    """Sender in layer l, receiver in l + 1, MLPs free: resid_pre[l+1] = mid + mlp(ln2(mid)) with
    mid = resid_mid_base[l] + (z_src - z_base)[sender] @ W_O[sender]; unlisted senders show no effect."""
    clean, corrupted, answer, contrast, positions = make_pairs(2)
    with torch.no_grad():
        _, cache_b = gpt2.run_with_cache(corrupted)
        _, cache_s = gpt2.run_with_cache(clean)
    s_l, r_l, r_h = 1, 2, 3
    senders = [(s_l, h) for h in range(4)]
    ours = path_patch(gpt2, clean, corrupted, answer, contrast, [(r_l, r_h)], "q", senders=senders,
                      answer_positions=positions)  # fmt: skip
    block = gpt2.blocks[s_l]
    name = f"blocks.{s_l}.attn.hook_z"
    for h in range(4):
        with torch.no_grad():
            mid = cache_b[f"blocks.{s_l}.hook_resid_mid"] + (cache_s[name] - cache_b[name])[:, :, h] @ gpt2.W_O[s_l, h]
            resid = mid + block.mlp(block.ln2(mid))
            value = _receiver_input(gpt2, resid, r_l, r_h, "q")
        expected = _with_receiver_input(gpt2, corrupted, f"blocks.{r_l}.attn.hook_q", r_h, value, positions,
                                        answer, contrast)  # fmt: skip
        torch.testing.assert_close(ours.patched_logit_diff[s_l, h], expected, atol=1e-4, rtol=0)
    assert float((ours.patched_logit_diff[s_l] - ours.corrupted_logit_diff).abs().max()) > 1e-2
    # layer 0 was not asked for: its cells hold the base (corrupted) run's logit difference, effect 0
    torch.testing.assert_close(ours.patched_logit_diff[0], ours.corrupted_logit_diff.expand(4, -1))
    torch.testing.assert_close(ours.effect()[0], torch.zeros(4))


def _reference(model, clean, corrupted, answer, contrast, positions, receivers, inp, direction, freeze_mlps):
    """Wang et al.'s two runs with plain full forwards, one sender at a time: ``[layer, head, batch]``."""
    base, src = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    with torch.no_grad():
        _, cb = model.run_with_cache(base)
        _, cs = model.run_with_cache(src)
    top, n_layers = max(l for l, _ in receivers), model.cfg.n_layers
    names = sorted({f"blocks.{l}.attn.hook_{inp}" for l, _ in receivers})
    out = torch.empty(top, model.cfg.n_heads, clean.shape[0])

    def freeze(z, hook, sender):  # run 1: every head's output the base run's, the sender's the source run's
        z = cb[hook.name].clone()
        if hook.name == f"blocks.{sender[0]}.attn.hook_z":
            z[:, :, sender[1]] = cs[hook.name][:, :, sender[1]]
        return z

    def patch(a, hook, sender, store):  # run 2: the receivers above the sender read run 1's inputs
        a = a.clone()
        for l, h in receivers:
            if hook.name == f"blocks.{l}.attn.hook_{inp}" and l > sender[0]:
                a[:, :, h] = store[hook.name][:, :, h]
        return a

    for sender in [(l, h) for l in range(top) for h in range(model.cfg.n_heads)]:
        store = {}
        hooks = [(f"blocks.{l}.attn.hook_z", partial(freeze, sender=sender)) for l in range(n_layers)]
        if freeze_mlps:
            hooks += [(f"blocks.{l}.hook_mlp_out", lambda a, hook: cb[hook.name]) for l in range(n_layers)]
        hooks += [(n, lambda a, hook, store=store: store.__setitem__(hook.name, a.clone())) for n in names]
        with torch.no_grad():
            model.run_with_hooks(base, fwd_hooks=hooks)
            logits = model.run_with_hooks(base, fwd_hooks=[(n, partial(patch, sender=sender, store=store))
                                                           for n in names])  # fmt: skip
        out[sender] = _ld(logits, positions, answer, contrast)
    return out


@pytest.mark.parametrize("freeze_mlps", [False, True])
def test_batched_runs_match_plain_two_run_path_patching_on_grouped_query_model(gqa, freeze_mlps):
    """Receivers in two layers, keys of key/value heads (grouped-query), senders tiled 2 per forward."""
    clean, corrupted, answer, contrast, positions = make_pairs(3)
    receivers = [(1, 0), (2, 1)]  # key/value heads: (2, 1) serves query heads 2 and 3 of layer 2
    ours = path_patch(gqa, clean, corrupted, answer, contrast, receivers, "k", direction="noising",
                      answer_positions=positions, freeze_mlps=freeze_mlps, max_rows=6)  # fmt: skip
    expected = _reference(gqa, clean, corrupted, answer, contrast, positions, receivers, "k", "noising", freeze_mlps)
    torch.testing.assert_close(ours.patched_logit_diff, expected, atol=1e-4, rtol=0)
    assert float((expected - ours.clean_logit_diff).abs().max()) > 1e-2
    assert all(not hp.fwd_hooks and not hp.bwd_hooks for hp in gqa.hook_dict.values())


def test_previous_token_head_feeds_the_induction_head_through_its_keys():
    """induction-2l: L0H1 (previous-token) -> L1H1 (induction) runs through the key, not the query."""
    model = load_model("fixture:induction-2l", device="cpu")
    g = torch.Generator().manual_seed(0)
    batch, n = 8, 12
    clean = repeated_random_tokens(model, batch, n, g)  # [BOS, r, r]
    pool = ordinary_token_ids(model)
    corrupted = clean.clone()  # the first copy replaced by other random tokens
    corrupted[:, 1 : 1 + n] = pool[torch.stack([torch.randperm(len(pool), generator=g)[:n] for _ in range(batch)])]
    positions = 1 + n + torch.randint(2, n - 1, (batch,), generator=g)  # inside the second copy
    rows = torch.arange(batch)
    answer = clean[rows, positions + 1]  # the induction prediction
    contrast = corrupted[rows, positions + 1 - n]  # the corrupted first copy's token in its place
    kw = {"direction": "noising", "answer_positions": positions}
    via_k = path_patch(model, clean, corrupted, answer, contrast, [(1, 1)], "k", **kw).effect()
    via_q = path_patch(model, clean, corrupted, answer, contrast, [(1, 1)], "q", **kw).effect()
    assert via_k.shape == (1, 4)
    assert float(via_k[0, 1]) < -0.15  # corrupting the previous-token signal in the keys loses the prediction
    assert abs(float(via_k[0, 1])) > 10 * abs(float(via_q[0, 1]))
    assert int(via_k[0].abs().argmax()) == 1  # L0H1 is the top sender for K


def test_bad_inputs_raise_with_the_reason(gpt2, gqa):
    clean, corrupted, answer, contrast, _ = make_pairs(4)
    args = (clean, corrupted, answer, contrast)
    cases = [
        (gpt2, [(2, 0)], "z", {}, "receiver_input must be"),
        (gpt2, [(3, 0)], "q", {}, r"receivers \[\(3, 0\)\] outside the model"),
        (gpt2, [(2, 4)], "q", {}, "outside the model"),
        (gqa, [(2, 2)], "k", {}, "2 key/value heads"),
        (gpt2, [], "q", {}, "receivers is empty"),
        (gpt2, [(0, 1), (0, 2)], "q", {}, "no valid senders"),
        (gpt2, [(1, 1)], "q", {"senders": [(1, 0)]}, "not below the deepest receiver"),
        (gpt2, [(1, 1)], "q", {"senders": [(0, 9)]}, "senders .* outside the model"),
        (gpt2, [(1, 1)], "q", {"direction": "sideways"}, "direction must be"),
        (gpt2, ["L1H1"], "q", {}, "pairs"),
    ]
    for model, receivers, inp, kw, msg in cases:
        with pytest.raises(InputError, match=msg):
            path_patch(model, *args, receivers, inp, **kw)
    # query heads of a grouped-query model go up to n_heads
    path_patch(gqa, *args, [(1, 3)], "q", senders=[(0, 0)])
