"""The attribution job: per-demo decomposition, the JSON that allows recomputation, the CLI, icl-tiny's circuit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from icl_circuits import InputError, load_model
from icl_circuits.attribution.demos import demo_attribution
from icl_circuits.attribution.job import attribute
from icl_circuits.models import list_fixtures
from icl_circuits.tasks.prompts import check_task
from icl_circuits.tasks.registry import get_task
from icl_circuits.tasks.roles import ROLE_NAMES, render_examples


@pytest.fixture(scope="module")
def ind2l():
    return load_model("fixture:induction-2l", device="cpu")


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
    # the norm reading is the size of each moved vector: non-negative, and zero where the head does not attend
    assert bool((da.norm >= 0).all())


def test_demo_attribution_rejects_bad_input(ind2l):
    _, tokens, roles, answers, contrasts = _prompts(ind2l, n=2)
    with pytest.raises(InputError, match="outside the model"):
        demo_attribution(ind2l, tokens, answers, contrasts, [(2, 0)], roles)
    with pytest.raises(InputError, match=r"\[batch=2\]"):
        demo_attribution(ind2l, tokens, answers[:1], contrasts, [(1, 1)], roles)
    with pytest.raises(InputError, match="heads is empty"):
        demo_attribution(ind2l, tokens, answers, contrasts, [], roles)


def test_attribution_json_allows_independent_recomputation(ind2l):
    att = attribute(ind2l, get_task("fixture-bound", ind2l), n_shots=5, n=6, seed=3, paths=False, progress=False)
    doc = att.to_json_dict()
    for key in ("model", "task", "method", "metric", "clean_tokens", "corrupted_tokens", "answer_tokens",
                "contrast_tokens", "clean_metric", "corrupted_metric", "heads", "positions", "methods", "correlations"):
        assert key in doc, key
    assert doc["method"] == "all" and set(doc["methods"]) == {"patching", "atp", "atp*"}
    assert set(doc["correlations"]) == {"atp", "atp*"}
    clean, corrupted = torch.tensor(doc["clean_tokens"]), torch.tensor(doc["corrupted_tokens"])
    answer, contrast = torch.tensor(doc["answer_tokens"]), torch.tensor(doc["contrast_tokens"])
    rows, pos = torch.arange(len(answer)), torch.tensor(doc["answer_positions"])

    def ld(logits):
        return logits[rows, pos, answer] - logits[rows, pos, contrast]

    with torch.no_grad():
        clean_ld, corrupted_ld = ld(ind2l(clean)), ld(ind2l(corrupted))
        assert doc["clean_metric"] == pytest.approx(float(clean_ld.mean()), abs=1e-4)
        assert doc["corrupted_metric"] == pytest.approx(float(corrupted_ld.mean()), abs=1e-4)
        # one head's exact patching effect, recomputed with a plain hook: clean z of L1H1 into the corrupted run
        _, cache = ind2l.run_with_cache(clean, names_filter="blocks.1.attn.hook_z")

        def patch(z, hook):
            z[:, :, 1] = cache["blocks.1.attn.hook_z"][:, :, 1]
            return z

        patched = ld(ind2l.run_with_hooks(corrupted, fwd_hooks=[("blocks.1.attn.hook_z", patch)]))
    want = float((patched.mean() - corrupted_ld.mean()) / (clean_ld.mean() - corrupted_ld.mean()))
    row = next(r for r in doc["heads"] if (r["layer"], r["head"]) == (1, 1))
    assert row["effect"] == pytest.approx(want, abs=1e-4)
    assert row["ci_low"] <= row["effect"] <= row["ci_high"]
    assert len(doc["positions"]) == ind2l.cfg.n_layers * clean.shape[1]
    assert {p["role"] for p in doc["positions"]} <= set(ROLE_NAMES)
    df = att.to_dataframe()
    assert list(df["name"][:1]) == [f"L{att.top_heads(1)[0][0]}H{att.top_heads(1)[0][1]}"]
    assert "<table" in att._repr_html_()


def test_single_method_and_bad_method(ind2l):
    task = get_task("fixture-bound", ind2l)
    att = attribute(ind2l, task, n_shots=4, n=4, method="atp", positions=True, paths=False, progress=False)
    doc = att.to_json_dict()
    assert doc["method"] == "atp" and "methods" not in doc and "positions" not in doc  # positions need exact patching
    with pytest.raises(InputError, match="method must be one of"):
        attribute(ind2l, task, method="ig")


def test_cli_writes_json_and_offline_html(tmp_path, capsys):
    from icl_circuits.cli import main

    out = tmp_path / "att"
    args = ["attribute", "--model", "fixture:induction-2l", "--task", "fixture-bound", "--shots", "4", "--n", "4"]
    assert main([*args, "--seed", "1", "--function-vectors", "--out", str(out)]) == 0
    doc = json.loads((out / "attribution.json").read_text())
    assert doc["provenance"]["seed"] == 1 and doc["provenance"]["model"]["spec"] == "fixture:induction-2l"
    assert doc["paths"]["receiver"][0] == 1 and set(doc["paths"]["inputs"]) == {"q", "k", "v"}
    assert "aie" in json.dumps(doc["function_vectors"])
    page = (out / "attribution.html").read_text()
    for title in ("Per-demo attribution", "Paths into", "Function-vector heads", "Residual stream"):
        assert title in page, title
    assert "<script src=" not in page
    bad = ["attribute", "--model", "fixture:induction-2l", "--task", "no-such-task", "--out", str(tmp_path / "x")]
    assert main(bad) == 2
    assert "unknown task 'no-such-task'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif("icl-tiny" not in list_fixtures(), reason="fixture:icl-tiny not built (make fixtures)")
def test_icl_tiny_top_heads_include_its_induction_heads_and_read_the_matching_demo():
    model = load_model("fixture:icl-tiny", device="cpu")
    att = attribute(model, get_task("fixture-bound", model), n_shots=8, n=32, method="patching", positions=False,
                    paths=False, progress=False)  # fmt: skip
    ov = att.induction_overlap()
    assert att.induction_heads, "head-scan found no induction head in icl-tiny"
    assert ov["induction_heads_in_top"], ov
    # the top head reads the demo whose key is the query key (where the bound answer sits)
    assert att.demos is not None
    tokens = att.batch.clean_tokens
    last = att.batch.last_positions
    hits = 0
    for b in range(tokens.shape[0]):
        query = tokens[b, last[b] - 1]
        keys = [p for p in range(int(last[b])) if int(att.roles.roles[b, p]) == ROLE_NAMES.index("demo_key")]
        match = int(att.roles.demo_index[b, next(p for p in keys if tokens[b, p] == query)])
        per_demo = torch.stack([att.demos.dla[0, b][att.roles.demo_index[b] == d].sum() for d in range(8)])
        hits += int(per_demo.argmax()) == match
    assert hits / tokens.shape[0] >= 0.8, hits


def test_atp_star_effects_are_the_normalised_magnitudes(ind2l):
    att = attribute(ind2l, get_task("fixture-bound", ind2l), n_shots=4, n=6, method="atp*", positions=False,
                    paths=False, progress=False)  # fmt: skip
    eff = att.heads["atp*"].effect()
    gap = att.heads["atp*"].clean_logit_diff - att.heads["atp*"].corrupted_logit_diff
    assert float(gap.mean()) < 0  # induction-2l does not do the task: the case where a naive ratio flips sign
    assert bool((eff >= -1e-6).all()), eff  # a magnitude, whatever the sign of the clean - corrupted gap
