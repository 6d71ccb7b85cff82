"""The fast-weights job: the CLI writes its JSON and offline HTML."""

from __future__ import annotations

import html
import json
import re

import pytest

pytestmark = pytest.mark.fixture


def test_cli_writes_json_and_offline_html(fixture_shaped, tmp_path):
    from icl_circuits.cli import main

    model_dir = fixture_shaped.icl_circuits_info.spec
    out = tmp_path / "fw"
    rc = main(["fast-weights", "--model", model_dir, "--task", "fixture-recorded0", "--shots", "3", "--n", "8",
               "--heads", "1.0,1.1", "--no-predictions", "--out", str(out)])  # fmt: skip
    assert rc == 0
    data = json.loads((out / "fast_weights.json").read_text())
    assert {"model", "task", "shots", "heads", "transplant", "provenance"} <= set(data)
    assert [(h["layer"], h["head"]) for h in data["heads"]] == [(1, 0), (1, 1)]
    assert {"effective_rank", "singular_values", "reconstruction_cosine", "demo_share"} <= set(data["heads"][0])
    assert {"zero_shot_acc", "with_vector_acc", "random_control_acc", "shuffled_control_acc"} <= set(data["transplant"])
    html = (out / "fast_weights.html").read_text()
    assert not re.search(r"<script[^>]+src=[\"']https?:", html) and "Plotly" in html
    assert "<bound method" not in html and "Top head by the demo part" in html
    # explained_variance (far below 0 where the demo part barely varies) is in the JSON, explained, not tabled
    assert "explained_variance" in data["heads"][0] and "<th>explained_variance</th>" not in html
    assert "falls far below 0 where the demo part barely varies" in html and "<th>index</th>" not in html
    assert main(["fast-weights", "--model", model_dir, "--task", "fixture-recorded0", "--heads", "9.9"]) == 2


def test_cli_and_page_say_what_was_skipped(fixture_shaped, tmp_path, capsys):
    """8 demos repeated r = 2, 3 times exceed the 64-token context: said on the page and by the command."""
    from icl_circuits.cli import main

    out = tmp_path / "fw"
    rc = main(["fast-weights", "--model", fixture_shaped.icl_circuits_info.spec, "--task", "fixture-recorded0",
               "--shots", "8", "--n", "4", "--heads", "1.0", "--no-transplant", "--out", str(out)])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "skipped: transplant: disabled" in printed
    for r in (2, 3):
        line = f"repeating the demos r = {r} times: the prompts exceed the model's context"
        assert f"skipped: predictions: {line}" in printed
        assert html.escape(line) in (out / "fast_weights.html").read_text()
    page = (out / "fast_weights.html").read_text()  # and on the repetition figure itself, beside its lone point
    assert "not measured: repeating the demos r = 2 times; repeating the demos r = 3 times" in page


def test_reading_at_chance_reads_no_transplant_and_no_beta(fixture_shaped):
    """An untrained model is at chance with demos: the reading says so and reads neither the transplant nor beta;
    the same run with above-chance numbers is read against chance and the controls."""
    from dataclasses import replace

    from icl_circuits.fast_weights.job import run_fast_weights

    run = run_fast_weights(fixture_shaped, "fixture-recorded0", 3, heads=[(1, 0)], n=16, seed=0)
    f = run.findings()
    assert run.few_shot["n"] == 16 and 0.0 <= run.few_shot["accuracy"] <= 1.0
    assert f["at_chance"] is True and run.to_dict()["few_shot_at_chance"] is True
    assert "is at chance" in f["reading"] and "not interpreted" in f["reading"]
    page = " ".join(p for s in run.sections() for p in s.paragraphs)
    assert "beta is not read" in page and "shrinkage beta 0" not in page and "above zero-shot and" not in page
    assert "not read as a transplanted task" in page
    learnt = replace(run, few_shot={**run.few_shot, "accuracy": 0.9})
    assert learnt.findings()["at_chance"] is False and "is at chance" not in learnt.findings()["reading"]
    assert "shrinkage beta" in " ".join(p for s in learnt.sections() for p in s.paragraphs)
    t = run.transplant
    good = replace(learnt, transplant=replace(t, zero_shot_acc=0.05, fast_weight_acc=0.8, fast_weight_random_acc=0.1,
                                              fast_weight_shuffled_acc=0.2, with_vector_acc=0.0))  # fmt: skip
    text = good.findings()["reading"]
    assert "the linear fast weight gives 0.80, above zero-shot and its controls (best 0.20)" in text
    assert "the task vector leaves it at chance (0.00)" in text
    as_control = replace(good, transplant=replace(good.transplant, fast_weight_shuffled_acc=0.8))
    assert "no better than zero-shot or its controls (best 0.80)" in as_control.findings()["reading"]
    recorded = replace(good, transplant=replace(good.transplant, zero_shot_acc=0.85))  # known without demos
    assert "no better than zero-shot or its controls (best 0.85)" in recorded.findings()["reading"]
    none = replace(good, transplant=replace(good.transplant, fast_weight_acc=0.0))
    assert "neither the task vector" in none.findings()["reading"]


def test_a_task_is_a_name_or_a_task(fixture_shaped):
    from icl_circuits.fast_weights.job import run_fast_weights
    from icl_circuits.tasks.registry import get_task

    kw = {"heads": [(1, 0)], "n": 8, "seed": 1, "transplant": False, "predictions": False}
    by_name = run_fast_weights(fixture_shaped, "fixture-recorded0", 3, **kw)
    by_task = run_fast_weights(fixture_shaped, get_task("fixture-recorded0", fixture_shaped), 3, **kw)
    assert by_task.to_dict() == by_name.to_dict()
