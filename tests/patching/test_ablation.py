"""Mean ablation (icl_circuits.patching.ablation) against TransformerLens's patching loop and plain hooks."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from icl_circuits import InputError, load_model
from icl_circuits.heads import scores as hd
from icl_circuits.patching import ablation as ab
from icl_circuits.patching.resume import BaseRun
from icl_circuits.tasks.scoring import answer_logits, padded_batch
from tests.patching_models import random_gpt2, random_llama2c

pytestmark = pytest.mark.fixture


@pytest.fixture(scope="module", params=["gpt2", "llama-gqa"])
def model(request, tmp_path_factory):
    """A tiny GPT-2 (LayerNorm, learned positions) and a tiny rotary Llama with 4 query / 2 key-value heads."""
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "gpt2":
        return load_model(str(random_gpt2(folder, n_layers=3)), device="cpu")
    return load_model(str(random_llama2c(folder / "m.bin", n_kv=2, n_layers=3)), device="cpu")


def _mean_cache(model, tokens):
    from transformer_lens import ActivationCache

    names = [f"blocks.{l}.attn.hook_z" for l in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return ActivationCache({n: cache[n].mean(0, keepdim=True).expand_as(cache[n]).clone() for n in names}, model)


def _tl_effects(model, tokens, metric):
    """TransformerLens: one full forward per head with z set to the per-position mean, minus the clean metric."""
    from transformer_lens import patching

    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    index = pd.DataFrame(heads, columns=["layer", "head"])
    with torch.no_grad():
        patched = patching.generic_activation_patch(model, tokens, _mean_cache(model, tokens), metric,
                                                    patching.layer_head_vector_patch_setter, "z", index_df=index)
        clean = float(metric(model(tokens)))
    return (patched.float() - clean).reshape(model.cfg.n_layers, model.cfg.n_heads)


def _gain_reference(tokens, n):
    """early - late with torch's cross entropy on the full logits (no code shared with the module)."""

    def metric(logits):
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none")  # [b, pos-1]
        return (nll[:, 1:n].mean(1) - nll[:, n + 1 : 2 * n].mean(1)).mean()

    return metric


def _ld_inputs(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, int(model.cfg.d_vocab), (5, 10), generator=gen)
    return tokens, tokens[:, 1], tokens[:, 2]


def test_logit_diff_sweep_equals_transformer_lens_patching(model):
    tokens, answers, contrasts = _ld_inputs(model)
    rows = torch.arange(len(tokens))
    theirs = _tl_effects(model, tokens, lambda lg: (lg[rows, -1, answers] - lg[rows, -1, contrasts]).mean())
    metric = ab.LogitDiff(answers, contrasts, torch.full((len(tokens),), tokens.shape[1] - 1))
    sweep = ab.mean_ablation_sweep(model, tokens, metric)
    assert sweep.resumed  # both architectures resume (BaseRun.check passed)
    assert torch.allclose(sweep.effect, theirs, atol=1e-4), float((sweep.effect - theirs).abs().max())
    assert float(theirs.abs().max()) > 1e-2  # these random heads matter


def test_in_context_gain_sweep_equals_transformer_lens_patching(model):
    n = 6
    tokens = hd.repeated_random_tokens(model, 4, n, torch.Generator().manual_seed(4))
    before = tokens.clone()
    theirs = _tl_effects(model, tokens, _gain_reference(tokens, n))
    tiled = ab.mean_ablation_sweep(model, tokens, ab.InContextGain(tokens, n))
    one_by_one = ab.mean_ablation_sweep(model, tokens, ab.InContextGain(tokens, n), max_rows=len(tokens))
    assert torch.equal(tokens, before)
    assert tiled.resumed and tiled.metric == "in_context_gain" and tiled.unit == "nats"
    assert torch.allclose(tiled.effect, theirs, atol=1e-4), float((tiled.effect - theirs).abs().max())
    assert torch.allclose(one_by_one.effect, theirs, atol=1e-4)
    before = torch.get_float32_matmul_precision()
    medium = ab.mean_ablation_sweep(model, tokens, ab.InContextGain(tokens, n), matmul_precision="medium")
    assert torch.get_float32_matmul_precision() == before  # restored
    assert torch.allclose(medium.effect, theirs, atol=1e-4), float((medium.effect - theirs).abs().max())
    assert float(theirs.abs().max()) > 1e-2
    with torch.no_grad():
        assert tiled.clean == pytest.approx(float(_gain_reference(tokens, n)(model(tokens))), abs=1e-5)


def test_pattern_change_equals_a_direct_ablated_run(model):
    n, sender = 6, (0, 1)
    tokens = hd.repeated_random_tokens(model, 4, n, torch.Generator().manual_seed(6))
    sweep = ab.mean_ablation_sweep(model, tokens, ab.InContextGain(tokens, n), heads=[sender],
                                   pattern_score=lambda p: hd.induction_stripe(p, n))
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(3)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names + ["blocks.0.attn.hook_z"])
        mean = cache["blocks.0.attn.hook_z"][:, :, 1].mean(0)
        patterns = {}

        def ablate(z, hook):
            z = z.clone()
            z[:, :, 1] = mean
            return z

        def grab(pattern, hook):
            patterns[hook.name] = pattern

        with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)] + [(nm, grab) for nm in names]):
            model(tokens)
    for l in range(3):
        want = hd.induction_score(patterns[names[l]], n) - hd.induction_score(cache[names[l]], n)
        assert torch.allclose(sweep.pattern_change[0, 1, l], want, atol=1e-5)
        assert torch.allclose(sweep.clean_pattern[l], hd.induction_score(cache[names[l]], n), atol=1e-6)
    assert sweep.pattern_change[0, 1, 0].abs().max() == 0  # a head cannot change its own layer's attention
    assert sweep.pattern_change[0, 1, 1:].abs().max() > 1e-3
    assert torch.isnan(sweep.effect).sum() == 3 * 4 - 1 and torch.isnan(sweep.pattern_change[1]).all()


def test_full_forward_fallback_agrees_on_ragged_prompts(model, monkeypatch):
    """Right-padded prompts; resumed runs and the tiled full-forward fallback give the same effects."""
    tokens, answers, contrasts = _ld_inputs(model, seed=5)
    ragged = [list(map(int, t)) for t in tokens]
    ragged[0] = ragged[0][:-3]  # one prompt shorter: right padding happens
    padded, last = padded_batch(model, ragged)
    metric = ab.LogitDiff(answers, contrasts, last)
    heads = [(0, 1), (1, 0), (2, 3)]
    fast = ab.mean_ablation_sweep(model, padded, metric, heads=heads, last_positions=last, max_rows=10)

    def unsupported(self, atol=1e-4):
        raise InputError("pretend the blocks cannot be resumed")

    monkeypatch.setattr(BaseRun, "check", unsupported)
    slow = ab.mean_ablation_sweep(model, padded, metric, heads=heads, last_positions=last)
    assert fast.resumed and not slow.resumed
    done = ~torch.isnan(fast.effect)
    assert int(done.sum()) == 3 and torch.equal(done, ~torch.isnan(slow.effect))
    assert torch.allclose(fast.effect[done], slow.effect[done], atol=1e-4) and float(fast.effect[done].abs().sum()) > 0
    # the reference: each head alone through ablated_logits (one full forward, means skipping padding)
    means = ab.mean_z(model, ragged)
    clean = answer_logits(model, ragged)
    rows = torch.arange(len(ragged))
    for l, h in heads:
        lg = ab.ablated_logits(model, ragged, [(l, h)], means=means)
        want = (lg[rows, answers] - lg[rows, contrasts]).mean() - (clean[rows, answers] - clean[rows, contrasts]).mean()
        assert float(fast.effect[l, h]) == pytest.approx(float(want), abs=1e-4)


def test_means_skip_padding_and_hooks_are_removed(model):
    short, long = [3, 7, 3, 8, 4, 9, 3], [3, 7, 3, 8, 4, 10, 3, 11, 4, 12, 3]
    means = ab.mean_z(model, [short, long], batch_size=1)
    with torch.no_grad():
        _, c_long = model.run_with_cache(torch.tensor([long]))
        _, c_short = model.run_with_cache(torch.tensor([short]))
    # beyond the short prompt only the long one counts; before it, the average of both
    assert torch.allclose(means[0][8], c_long["blocks.0.attn.hook_z"][0, 8], atol=1e-6)
    both = (c_long["blocks.1.attn.hook_z"][0, 2] + c_short["blocks.1.attn.hook_z"][0, 2]) / 2
    assert torch.allclose(means[1][2], both, atol=1e-6)
    before = answer_logits(model, [short, long])
    assert not torch.allclose(before, ab.ablated_logits(model, [short, long], [(1, 0), (1, 2)]))
    assert torch.equal(answer_logits(model, [short, long]), before)  # hooks gone


def test_sign_negative_for_the_induction_heads_of_a_trained_fixture():
    """On fixture:induction-2l, layer 1's heads are induction heads (head-scan tests): removing them lowers
    both the in-context gain and the logit difference of the repeated next token, so effect < 0 = helps."""
    model = load_model("fixture:induction-2l", device="cpu")
    n = 10
    tokens = hd.repeated_random_tokens(model, 8, n, torch.Generator().manual_seed(0))
    gain = ab.mean_ablation_sweep(model, tokens, ab.InContextGain(tokens, n), heads=[(1, h) for h in range(4)])
    pos = torch.full((8,), 2 * n - 1)  # predicts r[n-1], whose first occurrence the induction heads find
    ld = ab.LogitDiff(tokens[:, 2 * n], tokens[:, n - 1], pos)  # the repeated token against the one before it
    lds = ab.mean_ablation_sweep(model, tokens[:, : 2 * n], ld, heads=[(1, h) for h in range(4)])
    assert gain.clean > 0.5  # the model learns in context: early - late in nats
    assert bool((gain.effect[1] < 0).all()) and bool((lds.effect[1] < 0).all()), (gain.effect[1], lds.effect[1])
    assert gain.to_dict()["sign"].startswith("effect = metric(ablated) - metric(clean)")


def test_bad_input_raises_with_the_reason(model):
    tokens, answers, contrasts = _ld_inputs(model)
    metric = ab.LogitDiff(answers, contrasts, torch.full((len(tokens),), tokens.shape[1] - 1))
    with pytest.raises(InputError, match=r"\(3, 0\).*outside the model \(3 layers x 4 heads\)"):
        ab.mean_ablation_sweep(model, tokens, metric, heads=[(3, 0)])
    with pytest.raises(InputError, match="max_rows"):
        ab.mean_ablation_sweep(model, tokens, metric, max_rows=0)
    with pytest.raises(InputError, match=r"answer_ids/contrast_ids must be \[5\]"):
        ab.LogitDiff(answers[:3], contrasts, torch.zeros(5, dtype=torch.long))
    with pytest.raises(InputError, match=r"tokens \[batch, \(1 \+\) 2 \* seq_len\].*got seq_len=6, tokens \[5, 10\]"):
        ab.InContextGain(tokens, 6)
    with pytest.raises(InputError, match="no mean activations for layers"):
        ab.ablation_hooks([(2, 0)], {0: torch.zeros(3, 4, 8)})
