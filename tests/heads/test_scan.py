"""The head scan: roles, thresholds, the circuit, on random and trained models."""

from __future__ import annotations

import json

import pytest
import torch

from icl_circuits import InputError
from icl_circuits.heads.report import save_head_scan
from icl_circuits.heads.scan import RoleThresholds, scan_heads
from tests.helpers import REMOTE_SCRIPT


def _hook_count(model) -> int:
    return sum(len(getattr(hp, "fwd_hooks", [])) for hp in model.hook_dict.values())


@pytest.mark.unit
def test_role_thresholds_validate():
    with pytest.raises(InputError, match="induction"):
        RoleThresholds(induction=1.5)
    with pytest.raises(InputError, match="copying"):
        RoleThresholds(copying=2.0)


@pytest.mark.fixture
def test_scan_is_seeded_and_leaves_no_hooks(tiny_gpt2):
    hooks = _hook_count(tiny_gpt2)
    a = scan_heads(tiny_gpt2, seq_len=8, batch=4, seed=3, progress=False)
    b = scan_heads(tiny_gpt2, seq_len=8, batch=4, seed=3, progress=False)
    c = scan_heads(tiny_gpt2, seq_len=8, batch=4, seed=4, ablation=False, progress=False)
    assert _hook_count(tiny_gpt2) == hooks
    for m in ("induction", "prefix_matching", "ablation", "copying"):
        assert torch.equal(a.scores[m], b.scores[m])
    assert not torch.equal(a.scores["induction"], c.scores["induction"])
    assert c.score("ablation", 0, 0) is None and "ablation" not in c.heatmaps()
    df = a.to_dataframe()
    assert len(df) == 8 and list(df["induction"]) == sorted(df["induction"], reverse=True)
    metrics = {"induction", "prefix_matching", "previous_token", "duplicate_token", "copying", "ablation"}
    assert set(a.heatmaps()) == metrics and len(a.plot().data) == len(metrics)
    assert "<table" in a._repr_html_()


@pytest.mark.fixture
def test_ablation_batch_sweeps_the_first_sequences_and_records_stages(tiny_gpt2):
    from icl_circuits.patching.ablation import InContextGain, mean_ablation_sweep
    from icl_circuits.tasks.defaults import DEFAULTS, model_kind

    lines: list[str] = []
    scan = scan_heads(tiny_gpt2, seq_len=8, batch=6, seed=3, ablation_batch=2, progress=False, log=lines.append)
    first = scan.tokens[:2]
    direct = mean_ablation_sweep(tiny_gpt2, first, InContextGain(first, 8)).effect
    assert scan.ablation_batch == 2 and torch.allclose(scan.scores["ablation"], direct, atol=1e-6)
    whole = scan_heads(tiny_gpt2, seq_len=8, batch=6, seed=3, ablation_batch=6, progress=False)
    assert whole.ablation_batch == 6 and not torch.allclose(whole.scores["ablation"], direct, atol=1e-6)
    kind_default = DEFAULTS[model_kind(tiny_gpt2)]["head-scan"]["ablation_batch"]
    by_default = scan_heads(tiny_gpt2, seq_len=8, batch=6, seed=3, progress=False).ablation_batch
    assert by_default == (6 if kind_default is None else min(kind_default, 6))
    assert torch.equal(whole.scores["induction"], scan.scores["induction"])  # the attention scores use all 6
    assert any("mean-ablation sweep (8 heads x 2 sequences)" in line for line in lines)
    assert set(scan.timings) == {line.split(":")[0].strip() for line in lines} and len(lines) == 4
    doc = scan.to_dict()
    assert doc["ablation_batch"] == 2 and set(doc["timings_s"]) == set(scan.timings)
    with pytest.raises(InputError, match="ablation_batch"):
        scan_heads(tiny_gpt2, seq_len=8, batch=2, ablation_batch=3)


@pytest.mark.fixture
def test_scan_rejects_bad_arguments(tiny_gpt2):
    with pytest.raises(InputError, match="more than the model's context"):
        scan_heads(tiny_gpt2, seq_len=40, batch=2)
    with pytest.raises(InputError, match="batch"):
        scan_heads(tiny_gpt2, seq_len=8, batch=0)
    with pytest.raises(InputError, match="prefix_repeats"):
        scan_heads(tiny_gpt2, seq_len=8, batch=2, prefix_repeats=1)


@pytest.mark.fixture
def test_grouped_query_token_id_only_model(gqa_model, tmp_path):
    assert gqa_model.tokenizer is None and gqa_model.W_K.shape[1] == 2
    scan = scan_heads(gqa_model, seq_len=6, batch=4, seed=0, progress=False)
    assert scan.scores["ablation"].shape == (3, 4) and not torch.isnan(scan.scores["ablation"]).any()
    assert int(scan.tokens[0, 0]) == 1 and (scan.tokens[:, 1:] > 2).all()  # llama2.c BOS, no special tokens
    html = scan.attention_html(gqa_model, [(1, 0), (2, 3)])
    assert f"&lt;{int(scan.tokens[0, 1])}&gt;" in html or f"<{int(scan.tokens[0, 1])}>" in html
    json_path, html_path = save_head_scan(scan, gqa_model, tmp_path)
    doc = json.loads(json_path.read_text())
    assert doc["n_heads"] == 4 and len(doc["heads"]) == 12 and doc["provenance"]["model"]["has_tokenizer"] is False
    assert not REMOTE_SCRIPT.search(html_path.read_text())


@pytest.mark.real_model
@pytest.mark.shared
def test_aidreams_has_no_induction_head(aidreams):
    scan = scan_heads(aidreams, seq_len=20, batch=16, seed=0, progress=False)
    assert scan.induction_heads == [], scan.summary()
    assert scan.circuit == []


@pytest.mark.fixture
def test_induction_2l_names_its_circuit(induction_2l):
    """The issue's acceptance test: layer-1 induction heads, a layer-0 previous-token head, and the
    K-composition from it into each induction head is the largest of all layer-0 senders."""
    scan = scan_heads(induction_2l, seq_len=20, batch=16, seed=0, progress=False)
    ind, prev = scan.induction_heads, [lh for lh in scan.all_heads if "previous-token" in scan.roles(*lh)]
    assert ind and all(l == 1 for l, _ in ind), scan.summary()
    assert any(l == 0 for l, _ in prev), scan.summary() + "\n" + scan.to_dataframe().to_string()
    k = scan.composition["K"]
    for feeders in scan.circuit:
        l_r, h_r = feeders.receiver
        best = int(k[0, :, l_r, h_r].argmax())
        assert feeders.feeders and feeders.feeders[0] == (0, best)
        assert "previous-token" in scan.roles(0, best), scan.summary()
        assert feeders.z[0] >= scan.thresholds.feeder_min_z
        assert feeders.ablation_feeders, scan.summary()  # ablation names a feeder too
