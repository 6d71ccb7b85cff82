"""The head scan's JSON and offline HTML, through the CLI."""

from __future__ import annotations

import json
import re

import pytest

from tests.helpers import REMOTE_SCRIPT, require_fixture

pytestmark = pytest.mark.fixture


def test_cli_head_scan_writes_the_documented_json(tiny_gpt2_dir, tmp_path, capsys):
    from icl_circuits.cli import main

    rc = main(["head-scan", "--model", str(tiny_gpt2_dir), "--seq-len", "8", "--batch", "4", "--seed", "2",
               "--no-ablation", "--out", str(tmp_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "induction" in printed and "head_scan.html" in printed
    doc = json.loads((tmp_path / "head_scan.json").read_text())
    assert (doc["model"], doc["n_layers"], doc["n_heads"], doc["seed"], doc["seq_len"]) == (
        str(tiny_gpt2_dir), 2, 4, 2, 8)
    head_keys = {"layer", "head", "induction", "prefix_matching", "previous_token", "duplicate_token", "copying",
                 "ablation", "roles"}
    assert all(set(h) == head_keys and h["ablation"] is None for h in doc["heads"])
    assert all(isinstance(h[k], float) for h in doc["heads"] for k in ("induction", "copying"))
    assert isinstance(doc["induction_heads"], list) and doc["thresholds"]["induction"] == 0.4
    assert {"baseline", "pairs"} <= set(doc["composition"]) and "circuit" in doc
    html = (tmp_path / "head_scan.html").read_text()
    assert not REMOTE_SCRIPT.search(html) and "plotly" in html and "circuitsvis" in html.lower()
    rc = main(["head-scan", "--model", str(tiny_gpt2_dir), "--seq-len", "40", "--out", str(tmp_path)])
    assert rc == 2 and "seq_len <= 31" in capsys.readouterr().err


def test_demo_scans_icl_tiny(tmp_path, capsys):
    from icl_circuits.cli import main

    require_fixture("icl-tiny")
    assert main(["demo", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "head_scan.json").read_text())
    assert doc["model"] == "fixture:icl-tiny" and doc["induction_heads"], capsys.readouterr().out
    assert any(entry["feeders"] for entry in doc["circuit"]), doc["circuit"]
    assert all(h["ablation"] is not None for h in doc["heads"])
    page = (tmp_path / "head_scan.html").read_text()
    text = re.sub(r"<script.*?</script>", "", page, flags=re.S)
    assert "mean-ablation effect &lt; 0 nats" in text and "-0.0 " not in text  # no negative zero (HTML-escaped <)


def test_ranked_note_says_the_20_highest_only_when_there_are_more():
    from icl_circuits.heads.report import ranked_note

    assert ranked_note(16, 20) == "All 16 heads, by induction score."
    assert ranked_note(270, 20).startswith("The 20 highest induction scores of 270 heads")
