"""The analyses: readouts against TransformerLens and analytic answers, each analysis end to end, the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_circuits import InputError, TaskError
from icl_circuits.analyze import ANALYSES, Analysis, get_analysis, run_analysis, save_analysis
from icl_circuits.analyze.base import head_logit_attribution, uses_corpus_vocab
from icl_circuits.analyze.information_flow import flow_masks, flows, saliency
from icl_circuits.analyze.order import demo_set_queries, fix_mapping, orders
from icl_circuits.analyze.unseen_task import classify
from icl_circuits.models import fixtures_dir
from icl_circuits.tasks import corpus
from icl_circuits.tasks.prompts import build_prompts, check_task
from icl_circuits.tasks.registry import FixtureTask, Pair, PairTask, Template, get_task
from icl_circuits.tasks.scoring import answer_logits, label_log_probs, score_prompts, scores_from_logits

ROOT = Path(__file__).resolve().parent.parent
WORD_TEMPLATE = Template(io_sep=" w0 ", demo_sep=" w1 ", filler="w2")


@pytest.fixture(scope="module")
def fixture_like(tmp_path_factory):
    """A random 2-layer GPT-2 on the fixture vocabulary, with corpus.json: the fixture format, untrained."""
    return load_fixture_like(tmp_path_factory.mktemp("fixture_like"))


def load_fixture_like(folder):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fixtures.train import build_tokenizer
    from icl_circuits import load_model

    torch.manual_seed(0)  # HF initialises from the global generator
    cfg = GPT2Config(vocab_size=len(corpus.VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=1)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    (folder / "corpus.json").write_text(json.dumps(corpus.CorpusConfig().to_dict()))
    return load_model(str(folder), device="cpu"), folder


@pytest.fixture(scope="module")
def word_task() -> PairTask:
    """tiny_gpt2's vocabulary is w0..w45; inputs of 1-3 words, so prompts differ in length."""
    pairs = [Pair(" ".join(f"w{3 + (i + j) % 20}" for j in range(1 + i % 3)), f"w{30 + i % 12}") for i in range(24)]
    return PairTask("words", pairs, template=WORD_TEMPLATE)


# ---------------------------------------------------------------- readouts against the project's scoring and TL


def test_answer_logits_give_the_scores_of_score_prompts(tiny_gpt2, word_task):
    ps = build_prompts(tiny_gpt2, word_task, 3, 10, seed=0)
    assert len({len(t) for t in ps.tokens}) > 1  # ragged: padding happens
    ours = scores_from_logits(answer_logits(tiny_gpt2, ps.tokens, batch_size=3), ps.answer_ids, ps.contrast_ids)
    ref = score_prompts(tiny_gpt2, ps)
    assert torch.equal(ours.correct, ref.correct) and torch.equal(ours.rank, ref.rank)
    assert torch.allclose(ours.logit_diff, ref.logit_diff, atol=1e-4)
    assert torch.allclose(ours.prob, ref.prob, atol=1e-6)


def test_label_log_probs_renormalise_over_the_labels():
    final = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([2, 5, 7])
    lq = label_log_probs(final, labels)
    assert torch.allclose(lq.exp().sum(-1), torch.ones(3))
    # label log-prob differences are logit differences (the calibration identity relies on it)
    assert torch.allclose(lq[:, 0] - lq[:, 1], final[:, 2] - final[:, 5], atol=1e-5)


@pytest.mark.parametrize("which", ["tiny_gpt2", "fixture_like"])
def test_head_attribution_equals_transformer_lens_stacked_head_results(which, request):
    model = request.getfixturevalue(which)
    model = model[0] if isinstance(model, tuple) else model
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, 40, (4, 9), generator=g)
    answers, contrasts = torch.randint(3, 40, (4,), generator=g), torch.randint(3, 40, (4,), generator=g)
    ours = head_logit_attribution(model, tokens, answers, contrasts, batch_size=3)  # [batch, L, H]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        stacked = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [L*H, batch, d_model]
    W_U = model.W_U.detach()
    ref = torch.einsum("kbd,db->bk", stacked, W_U[:, answers] - W_U[:, contrasts]).reshape(ours.shape)
    assert torch.allclose(ours, ref, atol=1e-4), float((ours - ref).abs().max())


# ---------------------------------------------------------------- saliency (Wang et al.)


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


# ---------------------------------------------------------------- pure helpers


def test_orders_queries_and_fixed_mappings():
    rng = np.random.default_rng(0)
    all_perms = orders(3, 24, rng)
    assert len(all_perms) == 6 and len(set(all_perms)) == 6
    some = orders(5, 10, rng)
    assert len(some) == 10 and len(set(some)) == 10 and some[0] == (0, 1, 2, 3, 4)
    rule = FixtureTask("rule")
    fixed = fix_mapping(rule, rng)
    assert fixed.shift in rule.cfg.train_shifts and fixed.name == rule.name
    bound = FixtureTask("bound")
    assert fix_mapping(bound, rng) is bound  # a fresh binding per prompt: nothing to fix


def test_demo_set_queries(fixture_like):
    model, _ = fixture_like
    rng = np.random.default_rng(0)
    rule = FixtureTask("rule", shift=2)
    checked = check_task(model, rule)
    demos = rule.draw(rng, 4).demos
    qs = demo_set_queries(checked, rule, demos, 6, rng)
    assert len(qs) == 6 and not {q.input for q in qs} & {d.input for d in demos}
    assert all(q.output == corpus.shift_map(2)[q.input] for q in qs)
    bound = FixtureTask("bound")
    demos = bound.draw(rng, 4).demos
    assert set(demo_set_queries(check_task(model, bound), bound, demos, 8, rng)) == set(demos)


def test_classify_seen_and_unseen():
    cfg = corpus.CorpusConfig()
    assert classify("fixture-rule-shift2", cfg) == "seen" and classify("fixture-rule-shift7", cfg) == "unseen"
    assert classify("antonym:substituted", cfg) == "unseen" and classify("antonym", cfg) == "seen"


def test_uses_corpus_vocab(fixture_like, tiny_gpt2):
    assert uses_corpus_vocab(fixture_like[0]) and not uses_corpus_vocab(tiny_gpt2)


# ---------------------------------------------------------------- every analysis end to end


SMALL = {  # small settings per analysis so each runs in seconds on the 2-layer random model
    "shots-and-noise": {"n": 8, "shots": (0, 2, 4), "noise": (0.0, 0.5), "noise_shots": 4},
    "order": {"n": 2, "n_orders": 4, "queries": 3, "shots": 3},
    "repetition": {"n": 6, "repeats": (1, 2)},
    "label-binding": {"n": 8, "heads": [(1, 0), (1, 3)], "n_controls": 2},
    "information-flow": {"n": 6},
    "unseen-task": {"n": 6, "shots": (0, 2), "head_shots": 2},
    "record-vs-circuit": {"n": 4},
}


def test_registry():
    assert set(ANALYSES) == set(SMALL)
    assert all(spec.name == name for name, spec in ANALYSES.items())
    with pytest.raises(InputError, match="known: order, shots-and-noise"):
        get_analysis("nope")


@pytest.mark.parametrize("name", [n for n in SMALL if n != "record-vs-circuit"])
def test_analysis_runs_saves_and_reads_its_numbers(name, fixture_like, tmp_path):
    model, _ = fixture_like
    result = ANALYSES[name].run(model, seed=3, progress=False, **SMALL[name])
    assert isinstance(result, Analysis) and result.name == name and result.seed == 3
    assert len(result.to_dataframe()) > 0 and len(result.plot()) >= 1
    assert all(s.title and s.body for s in result.sections())
    assert "<h4>" in result._repr_html_()
    findings = result.findings()
    assert isinstance(findings["reading"], str) and findings["reading"]
    json_path, html_path = save_analysis(result, model, tmp_path, seed=3, n=SMALL[name].get("n"))
    data = json.loads(json_path.read_text())
    assert data["analysis"] == name and data["provenance"]["seed"] == 3
    assert data["provenance"]["model"]["spec"] == str(fixture_like[1])
    html = html_path.read_text()
    assert "plotly" in html and "Provenance" in html and html.count('class="reading"') >= 1


def test_readings_are_computed_from_the_numbers(fixture_like):
    """The reading quotes the measured values; other numbers give another reading."""
    from dataclasses import replace

    from icl_circuits.analyze.base import fmt

    model, _ = fixture_like
    r = ANALYSES["shots-and-noise"].run(model, seed=0, progress=False, **SMALL["shots-and-noise"])
    task = r.tasks[0]
    a0, a4 = r.value(task, 0, 0.0), r.value(task, 4, 0.0)
    assert f"{fmt(a0)}" in r.findings()["reading"]
    fake = tuple({**row, "accuracy": 0.9} if row["shots"] == 4 and row["noise"] == 0 else row for row in r.grid)
    changed = replace(r, grid=fake)
    assert "rises from" in changed.findings()["reading"] and "0.90" in changed.findings()["reading"]
    assert changed.findings()["reading"] != r.findings()["reading"] or a4 == 0.9


def test_same_seed_same_result_other_seed_other_prompts(fixture_like):
    model, _ = fixture_like
    kw = {"progress": False, **SMALL["order"]}
    a = ANALYSES["order"].run(model, seed=1, **kw).to_dict()
    b = ANALYSES["order"].run(model, seed=1, **kw).to_dict()
    c = ANALYSES["order"].run(model, seed=2, **kw).to_dict()
    assert a["rows"] == b["rows"] and a["rows"] != c["rows"]


def test_bad_inputs_raise_project_errors(fixture_like):
    model, _ = fixture_like
    with pytest.raises(InputError, match="n=0"):
        run_analysis("order", model, n=0, progress=False)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ANALYSES["shots-and-noise"].run(model, n=4, noise=(1.5,), progress=False)
    with pytest.raises(TaskError, match="unknown task"):
        run_analysis("information-flow", model, n=2, tasks=["no-such-task"], progress=False)


def test_unseen_task_adds_substituted_variants_when_none_is_unseen(fixture_like):
    model, _ = fixture_like
    r = ANALYSES["unseen-task"].run(model, tasks=["fixture-rule-shift1"], n=4, shots=(1,), head_shots=1,
                                    progress=False)  # fmt: skip
    assert {row["task"] for row in r.rows} == {"fixture-rule-shift1", "fixture-rule-shift1:substituted"}
    assert set(r.head_effects) == {"seen", "unseen"}


def test_record_vs_circuit_collects_all_and_writes_each_part(fixture_like, tmp_path):
    model, _ = fixture_like
    r = run_analysis("record-vs-circuit", model, n=4, progress=False)
    assert [p.name for p in r.parts] == [n for n in ANALYSES if n != "record-vs-circuit"]
    assert len(r.rows()) == 6 and all(row["reading"] for row in r.rows())
    save_analysis(r, model, tmp_path, seed=0)
    assert {p.stem for p in tmp_path.glob("*.html")} == {n.replace("-", "_") for n in ANALYSES}


@pytest.mark.shared
def test_language_model_path_on_aidreams(aidreams):
    """A real LM outside the fixture vocabulary: task files usable with its tokenizer, content-free "N/A"."""
    r = ANALYSES["order"].run(aidreams, n=2, n_orders=3, queries=2, progress=False)
    assert set(r.content_free.values()) == {"N/A"} and not any(t.startswith("fixture-") for t in r.tasks)
    assert len(r.tasks) == 2 and all(check_task(aidreams, get_task(t)).task.max_shots >= 5 for t in r.tasks)


def test_no_usable_default_task_says_why(tiny_gpt2):
    with pytest.raises(TaskError, match="no default task is usable.*antonym"):
        run_analysis("information-flow", tiny_gpt2, n=2, progress=False)


# ---------------------------------------------------------------- CLI and scripts


def test_cli_analyze_writes_json_and_html(fixture_like, tmp_path, capsys):
    from icl_circuits.cli import main

    _, folder = fixture_like
    assert main(["analyze", "list"]) == 0
    assert "information-flow" in capsys.readouterr().out
    argv = ["analyze", "information-flow", "--model", str(folder), "--n", "3", "--seed", "5", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "information_flow.json").read_text())
    assert data["seed"] == 5 and data["provenance"]["args"]["n"] == 3
    assert main(["analyze", "nope", "--model", str(folder)]) == 2
    assert "unknown analysis 'nope'" in capsys.readouterr().err


def test_scripts_wrap_the_cli(monkeypatch, capsys):
    import runpy

    scripts = sorted(p for p in (ROOT / "analyses").glob("*.py") if p.stem != "__init__")
    assert {p.stem.replace("_", "-") for p in scripts} == set(ANALYSES)
    for path in scripts:
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(path), run_name="__main__")
        assert done.value.code == 0
        assert "--tasks" in capsys.readouterr().out  # the help of `icl-circuits analyze`
    out = subprocess.run([sys.executable, str(scripts[0]), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model" in out.stdout and "--seed" in out.stdout


# ---------------------------------------------------------------- the trained fixture


@pytest.fixture(scope="module")
def icl_tiny():
    if not (fixtures_dir() / "icl-tiny" / "config.json").is_file():
        pytest.skip("fixtures/icl-tiny is not built (run `make fixtures`)")
    from icl_circuits import load_model

    return load_model("fixture:icl-tiny", device="cpu")


def test_icl_tiny_grid_agrees_with_evaluate(icl_tiny):
    from icl_circuits.tasks.scoring import evaluate

    r = ANALYSES["shots-and-noise"].run(icl_tiny, n=32, tasks=["fixture-rule"], shots=(0, 8), noise=(0.0, 0.5),
                                        progress=False)  # fmt: skip
    ev = evaluate(icl_tiny, "fixture-rule", shots=(8,), n=32, noise=0.5)
    assert r.value("fixture-rule", 8, 0.5) == pytest.approx(ev.accuracy(8))
    assert all(math.isfinite(row["beta"]) for row in r.shrink)


def test_icl_tiny_bound_task_needs_its_induction_heads(icl_tiny):
    """Where the fixture solves the bound task from context, ablating the head scan's induction heads
    must hurt it more than ablating as many other heads (the circuit, not any four heads)."""
    r = ANALYSES["label-binding"].run(icl_tiny, n=64, tasks=["fixture-bound"], progress=False)
    own = next(row for row in r.rows if row["labels"] == "own")
    if own["accuracy"] < 0.5:
        pytest.skip(f"fixture-bound accuracy {own['accuracy']:.2f}: this fixture does not solve the task in context")
    assert r.induction_heads, "the head scan found no induction head in icl-tiny"
    assert own["accuracy"] - own["accuracy_ablated"] > own["accuracy"] - own["accuracy_control"]


def test_tour_notebook_executes(fixture_like, tmp_path, monkeypatch):
    """``analyses/tour.ipynb`` runs top to bottom (here on the small random model, few prompts)."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ICL_TOUR_MODEL", str(fixture_like[1]))
    monkeypatch.setenv("ICL_TOUR_N", "4")
    monkeypatch.setenv("ICL_TOUR_OUT", str(tmp_path / "tour"))
    nb = nbformat.read(ROOT / "analyses" / "tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    assert len(list((tmp_path / "tour").glob("*.html"))) == 6
