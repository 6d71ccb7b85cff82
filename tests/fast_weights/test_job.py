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
