"""Scoring: batched equals one at a time, metrics against a hand computation, evaluation, CLI, fixture accuracies."""

from __future__ import annotations

import json
import math

import pytest
import torch

from icl_circuits import InputError, TaskError
from icl_circuits.models import fixtures_dir
from icl_circuits.tasks.prompts import build_prompts, pad_right
from icl_circuits.tasks.registry import Pair, PairTask, Template
from icl_circuits.tasks.scoring import evaluate, score_prompts, score_tokens, shrink_coefficient
from tests.helpers import load_fixture

pytestmark = pytest.mark.fixture

# tiny_gpt2's vocabulary is w0..w45: "w0" separates input and output, "w1" the demos.
WORD_TEMPLATE = Template(io_sep=" w0 ", demo_sep=" w1 ", filler="w2")


@pytest.fixture(scope="module")
def word_task() -> PairTask:
    """Inputs of 1-3 words, so prompts differ in token length; 12 distinct single-word labels."""
    pairs = [Pair(" ".join(f"w{3 + (i + j) % 20}" for j in range(1 + i % 3)), f"w{30 + i % 12}") for i in range(24)]
    return PairTask("words", pairs, template=WORD_TEMPLATE)


def test_batched_scores_equal_one_at_a_time(tiny_gpt2, word_task):
    ps = build_prompts(tiny_gpt2, word_task, 3, 12, seed=0)
    assert len({len(t) for t in ps.tokens}) > 1  # padding really happens
    batched = score_prompts(tiny_gpt2, ps, batch_size=5)
    for i, toks in enumerate(ps.tokens):
        one = score_tokens(tiny_gpt2, [toks], ps.answer_ids[i : i + 1], ps.contrast_ids[i : i + 1])
        assert bool(one.correct[0]) == bool(batched.correct[i]) and int(one.rank[0]) == int(batched.rank[i])
        assert torch.allclose(one.logit_diff[0], batched.logit_diff[i], atol=1e-4)
        assert torch.allclose(one.prob[0], batched.prob[i], atol=1e-5)


@torch.no_grad()
def test_metrics_match_a_hand_computation(tiny_gpt2, word_task):
    ps = build_prompts(tiny_gpt2, word_task, 2, 6, seed=1)
    scores = score_prompts(tiny_gpt2, ps)
    tokens, last = pad_right(ps.tokens, 1)
    for i in range(len(ps)):
        logits = tiny_gpt2(torch.tensor([ps.tokens[i]]))[0, -1]
        a, c = int(ps.answer_ids[i]), int(ps.contrast_ids[i])
        assert int(scores.rank[i]) == int((logits > logits[a]).sum())
        assert bool(scores.correct[i]) == (int(logits.argmax()) == a)
        assert abs(float(scores.logit_diff[i]) - float(logits[a] - logits[c])) < 1e-4
        assert abs(float(scores.prob[i]) - float(logits.softmax(-1)[a])) < 1e-5
    # the padded tensor form with last_positions gives the same scores
    again = score_tokens(tiny_gpt2, tokens, ps.answer_ids, ps.contrast_ids, last_positions=last)
    assert torch.equal(again.rank, scores.rank)


def test_evaluation_result(tiny_gpt2, word_task):
    ev = evaluate(tiny_gpt2, word_task, shots=(0, 2), n=6, seed=0)
    df = ev.to_dataframe()
    assert list(df["shots"]) == [0, 2] and {"accuracy", "mean_rank", "logit_diff", "prob"} <= set(df.columns)
    assert ev.chance == pytest.approx(1 / 12)
    fig = ev.plot()
    assert fig.data[0].x == (0, 2)
    assert "words" in ev._repr_html_()
    json.dumps(ev.to_dict(), allow_nan=False)
    with pytest.raises(TaskError, match="shots=30 needs more pairs"):
        evaluate(tiny_gpt2, word_task, shots=(1, 30), n=2)
    with pytest.raises(TaskError, match="unknown task"):
        evaluate(tiny_gpt2, "no-such-task")


def test_cli_tasks_and_evaluate(tiny_gpt2_dir, tmp_path, capsys, word_task):
    from icl_circuits.cli import main

    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert "antonym" in out and "67 pairs" in out and "fixture-bound" in out
    path = tmp_path / "words.json"
    path.write_text(json.dumps([{"input": p.input, "output": p.output} for p in word_task.pairs]))
    # a task file uses the default template; tiny_gpt2 maps unknown "->" to <pad>, which is fine here
    res = tmp_path / "res"
    argv = ["evaluate", "--model", str(tiny_gpt2_dir), "--task", str(path), "--shots", "0, 1", "--n", "4"]
    assert main([*argv, "--out", str(res)]) == 0
    saved = json.loads((res / "evaluation.json").read_text())
    assert [r["shots"] for r in saved["rows"]] == [0, 1] and saved["provenance"]["args"]["n"] == 4
    assert main(["evaluate", "--model", str(tiny_gpt2_dir), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main([*argv[:-4], "--shots", "1,x"]) == 2


# ---------------------------------------------------------------- the trained fixture


@pytest.fixture(scope="module")
def icl_tiny():
    return load_fixture("icl-tiny")


def test_fixture_accuracies_through_the_tasks_api(icl_tiny):
    bound = evaluate(icl_tiny, "fixture-bound", shots=(0, 8), n=200)
    assert bound.accuracy(0) < 0.15 and bound.accuracy(8) >= 0.9
    assert evaluate(icl_tiny, "fixture-rule", shots=(8,), n=200).accuracy(8) >= 0.8
    recorded = evaluate(icl_tiny, "fixture-recorded", shots=(1, 2, 4, 8), n=200)
    assert all(r["accuracy"] >= 0.9 for r in recorded.rows)


def test_fixture_properties_reproduce_through_the_tasks_api(icl_tiny):
    """fixtures/properties.py measures ICL accuracy through this API: re-measuring gives MANIFEST.json's values."""
    from fixtures import properties
    from icl_circuits.tasks.registry import corpus_config_for

    props = properties.icl_properties(icl_tiny, corpus_config_for(icl_tiny))
    manifest = json.loads((fixtures_dir() / "MANIFEST.json").read_text())["fixtures"]["icl-tiny"]["properties"]
    assert props == pytest.approx({k: manifest[k] for k in props}, abs=1e-4)


def _log_softmax(row: list[float]) -> list[float]:
    s = math.log(sum(math.exp(x) for x in row))
    return [x - s for x in row]


def _beta(noisy: list[list[float]], clean: list[list[float]], zero: list[list[float]]) -> float:
    """sum_b <u_b, u0_b> / sum_b |u0_b|^2 in plain Python, with u = log q - log q_zero per row."""
    num = den = 0.0
    for x, c, z in zip(noisy, clean, zero):
        lx, lc, lz = _log_softmax(x), _log_softmax(c), _log_softmax(z)
        u, u0 = [a - b for a, b in zip(lx, lz)], [a - b for a, b in zip(lc, lz)]
        num += sum(a * b for a, b in zip(u, u0))
        den += sum(b * b for b in u0)
    return num / den


def test_two_labels_closed_form():
    """Two labels, zero-shot logits equal (q = 1/2), clean logit gap a, noisy gap b: with s(x) = log(1 + e^x),
    u0 = (a - s(a) + log 2, log 2 - s(a)) and u = (b - s(b) + log 2, log 2 - s(b))."""
    a, b = 2.0, 0.5

    def s(x: float) -> float:
        return math.log1p(math.exp(x))

    u0 = (a - s(a) + math.log(2), math.log(2) - s(a))
    u = (b - s(b) + math.log(2), math.log(2) - s(b))
    want = (u[0] * u0[0] + u[1] * u0[1]) / (u0[0] ** 2 + u0[1] ** 2)
    # a third vocabulary entry, far larger: it changes the full-vocabulary beta, not the label-renormalised one
    t = lambda x: torch.tensor([[x, 0.0, 5.0]])  # noqa: E731
    labels = torch.tensor([0, 1])
    got = shrink_coefficient(t(b), t(a), t(0.0), labels)
    assert got == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.2217, abs=1e-4)  # the numbers above, by hand: 0.5268 / 2.3763
    full = shrink_coefficient(t(b), t(a), t(0.0))
    assert full == pytest.approx(_beta([[b, 0, 5]], [[a, 0, 5]], [[0, 0, 5]]), rel=1e-6)
    assert abs(full - got) > 0.01  # the normalisation is what differs


def test_batch_is_pooled_and_shift_invariant():
    g = torch.Generator().manual_seed(0)
    zero, clean, noisy = (torch.randn(4, 6, generator=g) for _ in range(3))
    want = _beta(noisy.tolist(), clean.tolist(), zero.tolist())
    assert shrink_coefficient(noisy, clean, zero) == pytest.approx(want, rel=1e-5)
    shift = torch.randn(4, 1, generator=g)  # a per-row constant (compatibility mode's centred unembedding)
    assert shrink_coefficient(noisy + shift, clean - shift, zero) == pytest.approx(want, rel=1e-5)
    labels = torch.tensor([1, 3, 4])
    sub = [[[row[i] for i in (1, 3, 4)] for row in m.tolist()] for m in (noisy, clean, zero)]
    assert shrink_coefficient(noisy, clean, zero, labels) == pytest.approx(_beta(*sub), rel=1e-5)
    with pytest.raises(InputError, match=r"\[batch, d_vocab\]"):
        shrink_coefficient(noisy[:2], clean, zero)
