"""Function-vector heads: causal indirect effects against plain per-head runs, an identity, the overlap report."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from icl_circuits import InputError, load_model
from icl_circuits.attribution.function_vectors import (
    FunctionVectorHeads,
    function_vector,
    function_vector_heads,
    head_mean_patch,
)
from icl_circuits.tasks.pairs import patching_batch
from icl_circuits.tasks.registry import get_task
from tests.patching_models import make_pairs, random_gpt2, random_llama2c


def _plain_probs(model, tokens, answers, positions, patch=None):
    """``P(answer)`` at ``positions`` from a full forward; ``patch = (layer, head, value [d_head])`` sets that
    head's ``hook_z`` at ``positions`` (one plain run per head)."""
    rows = torch.arange(tokens.shape[0])
    hooks = []
    if patch is not None:
        layer, head, value = patch

        def hook(z, hook):
            z = z.clone()
            z[rows, positions, head] = value
            return z

        hooks = [(f"blocks.{layer}.attn.hook_z", hook)]
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    return torch.softmax(logits[rows, positions].float(), -1)[rows, answers]


@pytest.mark.fixture
def test_indirect_effects_match_one_plain_run_per_head(ind2l):
    """Todd et al.'s CIE recomputed head by head with run_with_hooks, for two fixture tasks."""
    tasks = [get_task("fixture-bound", ind2l), get_task("fixture-recorded0", ind2l)]
    fv = function_vector_heads(ind2l, tasks, shots=4, n=5, seed=1, max_rows=10)  # 2 heads per tiled forward
    assert fv.tasks == ("fixture-bound", "fixture-recorded0") and fv.cie_per_prompt.shape == (2, 2, 4, 5)
    for t, task in enumerate(tasks):
        pairs = patching_batch(ind2l, task, 4, 5, 1, corruption="shuffled_labels")
        last, answers = pairs.last_positions, pairs.answer_tokens
        rows = torch.arange(len(pairs))
        with torch.no_grad():
            _, cache = ind2l.run_with_cache(pairs.clean_tokens)
        p_corrupted = _plain_probs(ind2l, pairs.corrupted_tokens, answers, last)
        torch.testing.assert_close(fv.p_corrupted[t], p_corrupted, atol=1e-5, rtol=0)
        torch.testing.assert_close(fv.p_clean[t], _plain_probs(ind2l, pairs.clean_tokens, answers, last),
                                   atol=1e-5, rtol=0)  # fmt: skip
        for l in range(2):
            mean_z = cache[f"blocks.{l}.attn.hook_z"][rows, last].mean(0)  # [head, d_head]
            torch.testing.assert_close(fv.mean_z[t, l], mean_z, atol=1e-6, rtol=1e-5)
            for h in range(4):
                p = _plain_probs(ind2l, pairs.corrupted_tokens, answers, last, (l, h, mean_z[h]))
                torch.testing.assert_close(fv.cie_per_prompt[t, l, h], p - p_corrupted, atol=1e-5, rtol=0)
    # the effects are not all ~0 (a comparison of unpatched runs would pass the checks above)
    assert float(fv.cie_per_prompt.abs().max()) > 1e-2
    torch.testing.assert_close(fv.cie, fv.cie_per_prompt.mean(-1))
    torch.testing.assert_close(fv.aie, fv.cie_per_prompt.mean((0, -1)))  # equal prompts per task


@pytest.mark.fixture
@pytest.mark.parametrize("kind", ["gpt2", "gqa"])
def test_head_mean_patch_matches_plain_runs_on_random_models(tmp_path, kind):
    """Any ``mean_z``, ragged answer positions, heads split across tiled forwards; GPT-2 and a grouped-query llama."""
    if kind == "gpt2":
        model = load_model(str(random_gpt2(tmp_path)), device="cpu")
    else:
        model = load_model(str(random_llama2c(tmp_path / "gqa.bin")), device="cpu")
    tokens, other, answers, _, positions = make_pairs(5, batch=3)
    with torch.no_grad():
        _, cache = model.run_with_cache(other)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    mean_z = torch.stack([cache[f"blocks.{l}.attn.hook_z"][:, -1].mean(0) for l in range(n_layers)])
    patched, base = head_mean_patch(model, tokens, answers, positions, mean_z, max_rows=9)  # 3 heads per forward
    assert patched.shape == (n_layers, n_heads, 3)
    torch.testing.assert_close(base, _plain_probs(model, tokens, answers, positions), atol=1e-5, rtol=0)
    for l in range(n_layers):
        for h in range(n_heads):
            expected = _plain_probs(model, tokens, answers, positions, (l, h, mean_z[l, h]))
            torch.testing.assert_close(patched[l, h], expected, atol=1e-5, rtol=0)
    assert float((patched - base).abs().max()) > 1e-3


@pytest.mark.fixture
def test_patching_a_prompts_own_output_is_the_identity(ind2l):
    """CIE = 0 for every head when ``mean_z`` is the prompt's own output (batch of one, or identical prompts);
    the mean over several different corrupted prompts is not their own output, so there it is not 0."""
    pairs = patching_batch(ind2l, get_task("fixture-bound", ind2l), 4, 3, 2, corruption="shuffled_labels")
    tokens, answers, last = pairs.corrupted_tokens, pairs.answer_tokens, pairs.last_positions
    with torch.no_grad():
        _, cache = ind2l.run_with_cache(tokens)
    own = torch.stack([cache[f"blocks.{l}.attn.hook_z"][0, last[0]] for l in range(2)])  # prompt 0's own output
    for t, a, p in ((tokens[:1], answers[:1], last[:1]), (tokens[:1].repeat(3, 1), answers[:1].repeat(3),
                                                          last[:1].repeat(3))):  # fmt: skip
        patched, base = head_mean_patch(ind2l, t, a, p, own)
        torch.testing.assert_close(patched - base, torch.zeros_like(patched), atol=1e-6, rtol=0)
    mean = torch.stack([cache[f"blocks.{l}.attn.hook_z"][torch.arange(3), last].mean(0) for l in range(2)])
    patched, base = head_mean_patch(ind2l, tokens, answers, last, mean)
    assert float((patched - base).abs().max()) > 1e-4


def _constructed(aie: torch.Tensor) -> FunctionVectorHeads:
    n_l, n_h = aie.shape
    return FunctionVectorHeads(tasks=("a", "b"), cie_per_prompt=aie[None, :, :, None].expand(2, n_l, n_h, 3).clone(),
                               p_clean=torch.full((2, 3), 0.5), p_corrupted=torch.full((2, 3), 0.1),
                               mean_z=torch.zeros(2, n_l, n_h, 4), n_shots=4, seed=0)  # fmt: skip


@pytest.mark.unit
def test_overlap_with_another_score_reports_the_known_overlap():
    aie = torch.tensor([[0.9, 0.1, 0.5], [0.0, 0.7, 0.3]])  # top 3 by AIE: L0H0, L1H1, L0H2
    fv = _constructed(aie)
    torch.testing.assert_close(fv.aie, aie)
    assert fv.top(3) == [(0, 0), (1, 1), (0, 2)]
    induction = torch.tensor([[0.2, 0.95, 0.6], [0.05, 0.8, 0.1]])  # top 3: L0H1, L1H1, L0H2
    report = fv.overlap_with(induction, k=3)
    assert report["fv_heads"] == [(0, 0), (1, 1), (0, 2)] and report["other_heads"] == [(0, 1), (1, 1), (0, 2)]
    assert report["overlap"] == [(1, 1), (0, 2)] and report["fraction"] == pytest.approx(2 / 3)
    # Spearman = Pearson of the ranks (1 = smallest), by hand
    ra, rb = np.array([6, 2, 4, 1, 5, 3]), np.array([3, 6, 4, 1, 5, 2])
    expected = float(np.corrcoef(ra, rb)[0, 1])
    assert report["spearman"] == pytest.approx(expected)
    assert report["spearman"] == pytest.approx(stats.spearmanr(aie.flatten().numpy(), induction.flatten().numpy())[0])
    same, reverse = fv.overlap_with(aie * 2 + 1, k=2), fv.overlap_with(-aie, k=2)
    assert same["fraction"] == 1.0 and same["spearman"] == pytest.approx(1.0)
    assert reverse["overlap"] == [] and reverse["spearman"] == pytest.approx(-1.0)
    with pytest.raises(InputError, match=r"\[layer, head\]"):
        fv.overlap_with(torch.zeros(3, 2), k=2)
    with pytest.raises(InputError, match="k must be in 1..6"):
        fv.overlap_with(induction, k=7)


@pytest.mark.fixture
def test_dataframe_plot_html_dict_and_function_vector(ind2l):
    aie = torch.tensor([[0.01, -0.02, 0.3, 0.0], [0.05, 0.2, -0.1, 0.04]])
    fv = _constructed(aie)
    df = fv.to_dataframe()
    assert list(df.columns) == ["layer", "head", "aie", "rank", "cie[a]", "cie[b]"] and len(df) == 8
    assert list(zip(df["layer"], df["head"]))[:2] == [(0, 2), (1, 1)] and list(df["rank"]) == list(range(1, 9))
    np.testing.assert_allclose(np.asarray(fv.plot().data[0].z), aie.numpy(), rtol=1e-6)
    assert "icl-table" in fv._repr_html_() and "L0H2: +0.3000" in fv.summary()
    d = fv.to_dict()
    assert d["top"][:2] == [[0, 2], [1, 1]] and np.allclose(d["aie"], aie.numpy())
    mean_z = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(0))
    vec = function_vector(ind2l, [(0, 2), (1, 1)], mean_z)
    torch.testing.assert_close(vec, mean_z[0, 2] @ ind2l.W_O[0, 2] + mean_z[1, 1] @ ind2l.W_O[1, 1])
    with pytest.raises(InputError, match="outside the model"):
        function_vector(ind2l, [(2, 0)], mean_z)
    with pytest.raises(InputError, match="mean_z must be"):
        function_vector(ind2l, [(0, 0)], mean_z[:, :2])
    with pytest.raises(InputError, match="tasks is empty"):
        function_vector_heads(ind2l, [])
    tokens, _, answers, _, positions = make_pairs(0, vocab=60)
    with pytest.raises(InputError, match="mean_z must be"):
        head_mean_patch(ind2l, tokens, answers, positions, mean_z[:, :, :8])
    with pytest.raises(InputError, match="positions must be"):
        head_mean_patch(ind2l, tokens, answers, positions + 5, mean_z)
