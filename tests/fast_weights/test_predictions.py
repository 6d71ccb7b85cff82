"""Repetition, noise and order predictions of the fast-weight view, recomputed from plain forwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.fixture


def test_predictions_equal_a_recomputation_from_plain_forwards(fixture_shaped):
    """beta_p = sum <u_p, u_0> / sum |u_0|^2 with u_p = log_softmax(p-noisy prompt) - log_softmax(zero-shot), and
    the order change |dW(perm) - dW|_F / |dW|_F from the full ``W_O^T M`` matrices, recomputed here from the
    same draws (``default_rng(seed)`` for the examples, ``default_rng([seed, 1])`` for the manipulations, in
    the documented order) with plain forwards of the model."""
    from icl_circuits.fast_weights import decompose as fw
    from icl_circuits.fast_weights.predictions import measure_predictions
    from icl_circuits.tasks.prompts import check_task, flip_labels, permute_demos
    from icl_circuits.tasks.registry import FewShot, get_task
    from icl_circuits.tasks.roles import render_examples

    m, heads, seed = fixture_shaped, [(1, 0)], 2
    p = measure_predictions(m, "fixture-recorded0", 4, heads, n=6, repeats=(1, 2, 4), noise=(0.0, 0.5),
                            n_orders=2, seed=seed)  # fmt: skip
    assert [r["repeat"] for r in p.repetition] == [1, 2] and len(p.skipped) == 1
    assert p.skipped[0].startswith("repeating the demos r = 4 times: the prompts exceed the model's context")
    assert len(p.figures()) == 3 and set(p.to_dataframe()["experiment"]) == {"repetition", "noise", "order"}

    checked = check_task(m, get_task("fixture-recorded0", m))
    rng, manip = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    examples = [checked.task.draw(rng, 4) for _ in range(6)]

    def logp(exs):
        tokens, roles, answers, _ = render_examples(m, checked, exs)
        with torch.no_grad():
            logits = m(tokens)[torch.arange(len(exs)), roles.last_positions]
        return logits.log_softmax(-1), answers

    logp0, _ = logp([FewShot((), ex.query) for ex in examples])
    u = {q: logp([flip_labels(ex, q, checked.task.labels, manip) for ex in examples])[0] - logp0 for q in (0.0, 0.5)}
    beta = float((u[0.5] * u[0.0]).sum() / u[0.0].pow(2).sum())
    assert [r["noise"] for r in p.noise] == [0.0, 0.5]
    assert p.noise[1]["shrinkage_beta"] == pytest.approx(beta, rel=1e-4)
    assert p.noise[1]["update_norm"] == pytest.approx(float(u[0.5].norm(dim=-1).mean()), rel=1e-4)
    clean_logp, answers = logp(examples)
    assert p.noise[0]["accuracy"] == pytest.approx(float((clean_logp.argmax(-1) == answers).float().mean()))

    def fw_lin(exs):
        tokens, roles, _, _ = render_examples(m, checked, exs)
        return fw.decompose(m, tokens, roles, heads).fw_lin.double()  # [batch, head, d_model, d_head]

    base = fw_lin(examples)
    norm = base.flatten(2).norm(dim=-1)
    for row in p.order:
        perm = fw_lin([permute_demos(ex, manip) for ex in examples])
        expected = float(((perm - base).flatten(2).norm(dim=-1) / norm).mean())
        assert expected > 1e-3 and row["fw_rel_change"] == pytest.approx(expected, rel=1e-4)
    other = base.roll(1, dims=0)
    assert p.order[0]["fw_rel_change_other_demos"] == pytest.approx(
        float(((other - base).flatten(2).norm(dim=-1) / norm).mean()), rel=1e-4
    )
