"""Head scan: attention scores, copying, composition, mean ablation, roles, circuit, CLI and report.

Each measure is checked against an independent computation: TransformerLens's ``detect_head``,
``loss_per_token``, activation patching, dense products of the weights, or a naive loop.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from icl_circuits import InputError, load_model
from icl_circuits.heads import composition as comp
from icl_circuits.heads import scores as hd
from icl_circuits.heads.report import save_head_scan
from icl_circuits.heads.scan import RoleThresholds, scan_heads
from icl_circuits.models import fixtures_dir

REMOTE_SCRIPT = re.compile(r"<script[^>]+src=[\"']?(https?:)?//", re.IGNORECASE)


def _fixture(name: str):
    if not (fixtures_dir() / name / "config.json").is_file():
        pytest.skip(f"fixture {name} is not built (fixtures/{name}/config.json missing; run `make fixtures`)")
    return load_model(f"fixture:{name}", device="cpu")


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    """A random llama2.c checkpoint, 4 query heads sharing 2 key/value heads, loaded without a tokenizer."""
    from tests.test_llama2c import _random_checkpoint

    path = _random_checkpoint(tmp_path_factory.mktemp("gqa") / "gqa.bin", L=3, n_kv=2, seq_len=40)
    return load_model(str(path), device="cpu")


@pytest.fixture(scope="module")
def induction_2l():
    return _fixture("induction-2l")


def _random_patterns(batch: int, heads: int, pos: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, pos, pos, generator=g) * 2
    mask = torch.ones(pos, pos, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1)


# ---------------------------------------------------------------- pure scores, no model


def test_prefix_matching_equals_naive_loop_and_induction_for_two_copies():
    n, c = 5, 4
    pattern = _random_patterns(3, 2, 1 + c * n)
    naive = torch.zeros(3, 2)
    count = 0
    for q in range(1 + n, 1 + c * n):
        j = (q - 1) % n  # offset of the query's token in r
        earlier_next = [1 + i * n + j + 1 for i in range((q - 1) // n)]  # token after each earlier occurrence
        naive += pattern[:, :, q, earlier_next].sum(-1)
        count += 1
    assert torch.allclose(hd.prefix_matching_score(pattern, n, c), (naive / count).mean(0), atol=1e-6)
    two = _random_patterns(4, 3, 1 + 2 * n, seed=1)
    assert torch.allclose(hd.prefix_matching_score(two, n, 2), hd.induction_score(two, n), atol=1e-7)


def test_scores_of_an_ideal_induction_pattern():
    n = 6
    pos = 1 + 2 * n
    pattern = torch.zeros(1, 1, pos, pos)
    pattern[0, 0, 0, 0] = 1.0
    for q in range(1, pos):
        pattern[0, 0, q, q - n + 1 if q > n else q - 1] = 1.0  # stripe in copy 2, previous token in copy 1
    assert hd.induction_score(pattern, n).item() == pytest.approx(1.0)
    assert hd.duplicate_token_score(pattern, n).item() == pytest.approx(0.0)
    assert hd.previous_token_score(pattern).item() == pytest.approx(n / (2 * n))


def test_scores_reject_a_pattern_of_the_wrong_length():
    with pytest.raises(InputError, match=r"\[batch, head, 21, 21\]"):
        hd.induction_score(torch.zeros(1, 1, 20, 20), 10)
    with pytest.raises(InputError, match="3 copies"):
        hd.prefix_matching_score(torch.zeros(1, 1, 20, 20), 10, 3)


def test_eigenvalue_positivity_of_known_spectra():
    eye = torch.eye(4)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i: neither copies nor suppresses
    assert comp.eigenvalue_positivity(eye).item() == pytest.approx(1.0)
    assert comp.eigenvalue_positivity(-2 * eye).item() == pytest.approx(-1.0)
    assert comp.eigenvalue_positivity(rot).item() == pytest.approx(0.0, abs=1e-7)
    assert comp.eigenvalue_positivity(torch.diag(torch.tensor([3.0, -1.0]))).item() == pytest.approx(0.5)
    assert comp.eigenvalue_positivity(torch.zeros(3, 3)).item() == 0.0


def test_composition_baseline_equals_dense_products_of_the_same_draws():
    d_model, d_head, n = 12, 3, 50
    base = comp.composition_baseline(d_model, d_head, "K", n=n, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    draws = [torch.randn(n, *s, generator=g, dtype=torch.float64) for s in
             [(d_model, d_head), (d_head, d_model), (d_model, d_head), (d_model, d_head)]]
    ov = draws[0] @ draws[1]
    qk = draws[2] @ draws[3].transpose(-2, -1)
    norm = torch.linalg.matrix_norm
    dense = norm(ov @ qk.transpose(-2, -1)) / norm(ov) / norm(qk)
    assert base.mean == pytest.approx(float(dense.mean()), rel=1e-9)
    assert base.std == pytest.approx(float(dense.std()), rel=1e-9)


def test_role_thresholds_validate():
    with pytest.raises(InputError, match="induction"):
        RoleThresholds(induction=1.5)
    with pytest.raises(InputError, match="copying"):
        RoleThresholds(copying=2.0)


# ---------------------------------------------------------------- against TransformerLens, tiny random GPT-2


def _texts(model, tokens: torch.Tensor) -> list[str]:
    texts = [" ".join(model.tokenizer.convert_ids_to_tokens(row[1:].tolist())) for row in tokens]
    for text, row in zip(texts, tokens):
        assert model.to_tokens(text)[0].tolist() == row.tolist()  # same ids reach detect_head
    return texts


def _check_against_detect_head(model, n: int) -> torch.Tensor:
    """Exact relations to ``detect_head(..., error_measure="mul")``, sequence by sequence and for the list."""
    from transformer_lens.head_detector import detect_head

    tokens = hd.repeated_random_tokens(model, 3, n, torch.Generator().manual_seed(1))
    prefix = hd.repeated_random_tokens(model, 3, n, torch.Generator().manual_seed(2))
    texts = _texts(model, tokens)
    rows = 2 * n + 1  # detect_head divides by the sum of the whole pattern: one per row
    for i, text in enumerate(texts):
        ours, _ = hd.attention_scores(model, tokens[i : i + 1], n, prefix, 2)
        assert torch.allclose(ours["induction"], detect_head(model, text, "induction_head") * rows / n, atol=1e-5)
        assert torch.allclose(ours["duplicate_token"], detect_head(model, text, "duplicate_token_head") * rows / n,
                              atol=1e-5)
        prev = detect_head(model, text, "previous_token_head") * rows / (2 * n)
        assert torch.allclose(ours["previous_token"], prev, atol=1e-5)
    ours, _ = hd.attention_scores(model, tokens, n, prefix, 2)
    batch_mean = detect_head(model, texts, "induction_head") * rows / n  # the list path averages sequences
    assert torch.allclose(ours["induction"], batch_mean, atol=1e-5)
    return ours["induction"]


def test_attention_scores_match_detect_head(tiny_gpt2):
    _check_against_detect_head(tiny_gpt2, 10)


def test_attention_scores_match_detect_head_on_a_trained_induction_model(induction_2l):
    induction = _check_against_detect_head(induction_2l, 12)
    assert induction.max() > 0.4  # the relation is checked on large values, not only near zero


def test_in_context_losses_match_loss_per_token(tiny_gpt2):
    n = 9
    tokens = hd.repeated_random_tokens(tiny_gpt2, 4, n, torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = tiny_gpt2(tokens)
        per_token = tiny_gpt2(tokens, return_type="loss", loss_per_token=True)  # [batch, pos - 1]
    early, late = hd.in_context_losses(logits, tokens, n)
    assert torch.allclose(early, per_token[:, 1:n].mean(1), atol=1e-5)
    assert torch.allclose(late, per_token[:, n + 1 : 2 * n].mean(1), atol=1e-5)


def _dense_composition(model, mode: str) -> torch.Tensor:
    n_heads = model.cfg.n_heads
    W_V = model.W_V.repeat_interleave(n_heads // model.W_V.shape[1], dim=1)
    W_K = model.W_K.repeat_interleave(n_heads // model.W_K.shape[1], dim=1)
    ov = W_V @ model.W_O  # [L, H, d_model, d_model]
    qk = model.W_Q @ W_K.transpose(-2, -1)
    right = {"Q": qk, "K": qk.transpose(-2, -1), "V": ov}[mode]
    L = ov.shape[0]
    out = torch.zeros(L, n_heads, L, n_heads)
    for a in range(L):
        for b in range(a + 1, L):
            prod = ov[a][:, None] @ right[b][None]  # [H_a, H_b, d, d]
            out[a, :, b] = prod.norm(dim=(-2, -1)) / ov[a].norm(dim=(-2, -1))[:, None] / right[b].norm(dim=(-2, -1))
    return out


@pytest.mark.parametrize("which", ["tiny_gpt2", "gqa_model"])
def test_composition_scores_equal_transformer_lens_and_dense_products(which, request):
    model = request.getfixturevalue(which)
    with torch.no_grad():
        for mode in comp.MODES:
            ours = comp.composition_scores(model, mode)
            tl = model.all_composition_scores(mode).scores
            assert torch.allclose(ours, tl, atol=1e-5)
            assert torch.allclose(ours, _dense_composition(model, mode), atol=1e-5)
            assert ours[1:, :, 0].abs().max() == 0 and ours[-1].abs().max() == 0  # only earlier -> later
            assert ours[0, :, 1:].min() > 0


def test_copying_equals_eigenvalues_of_the_dense_full_ov_circuit(tiny_gpt2):
    from transformer_lens import FactoredMatrix

    pool = hd.ordinary_token_ids(tiny_gpt2)
    with torch.no_grad():
        W_E, W_U = tiny_gpt2.W_E[pool].double(), tiny_gpt2.W_U[:, pool].double()
        full = W_E @ tiny_gpt2.W_V.double() @ tiny_gpt2.W_O.double() @ W_U  # [L, H, |S|, |S|]
        dense = comp.eigenvalue_positivity(full)
        ours = comp.copying_scores(tiny_gpt2)
        fm = FactoredMatrix(W_E @ tiny_gpt2.W_V.double(), tiny_gpt2.W_O.double() @ W_U)
        eig = fm.eigenvalues
        tl = (eig.real.sum(-1) / eig.abs().sum(-1)).float()
        assert torch.allclose(ours, dense, atol=1e-5)
        assert torch.allclose(ours, tl, atol=1e-5)
        sampled = comp.copying_scores(tiny_gpt2, n_tokens=20, generator=torch.Generator().manual_seed(5))
        sub = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(5))[:20]]
        full_sub = tiny_gpt2.W_E[sub].double() @ tiny_gpt2.W_V.double() @ tiny_gpt2.W_O.double()
        assert torch.allclose(sampled, comp.eigenvalue_positivity(full_sub @ tiny_gpt2.W_U[:, sub].double()), atol=1e-5)
    with pytest.raises(InputError, match="generator"):
        comp.copying_scores(tiny_gpt2, n_tokens=20)


# ---------------------------------------------------------------- the scan


def _hook_count(model) -> int:
    return sum(len(getattr(hp, "fwd_hooks", [])) for hp in model.hook_dict.values())


def test_scan_is_seeded_and_leaves_no_hooks(tiny_gpt2):
    hooks = _hook_count(tiny_gpt2)
    a = scan_heads(tiny_gpt2, seq_len=8, batch=4, seed=3, progress=False)
    b = scan_heads(tiny_gpt2, seq_len=8, batch=4, seed=3, progress=False)
    c = scan_heads(tiny_gpt2, seq_len=8, batch=4, seed=4, ablation=False, progress=False)
    assert _hook_count(tiny_gpt2) == hooks
    for m in ("induction", "prefix_matching", "ablation", "copying"):
        assert torch.equal(a.scores[m], b.scores[m])
    assert not torch.equal(a.scores["induction"], c.scores["induction"])
    assert c.score("ablation", 0, 0) is None and "ablation" not in c.plot()
    df = a.to_dataframe()
    assert len(df) == 8 and list(df["induction"]) == sorted(df["induction"], reverse=True)
    assert set(a.plot()) == {"induction", "prefix_matching", "previous_token", "duplicate_token", "copying", "ablation"}
    assert "<table" in a._repr_html_()


def test_scan_rejects_bad_arguments(tiny_gpt2):
    with pytest.raises(InputError, match="more than the model's context"):
        scan_heads(tiny_gpt2, seq_len=40, batch=2)
    with pytest.raises(InputError, match="batch"):
        scan_heads(tiny_gpt2, seq_len=8, batch=0)
    with pytest.raises(InputError, match="prefix_repeats"):
        scan_heads(tiny_gpt2, seq_len=8, batch=2, prefix_repeats=1)


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


# ---------------------------------------------------------------- real and trained models


@pytest.mark.shared
def test_aidreams_has_no_induction_head(aidreams):
    scan = scan_heads(aidreams, seq_len=20, batch=16, seed=0, progress=False)
    assert scan.induction_heads == [], scan.summary()
    assert scan.circuit == []


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


def test_demo_scans_icl_tiny(tmp_path, capsys):
    from icl_circuits.cli import main

    _fixture("icl-tiny")
    assert main(["demo", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "head_scan.json").read_text())
    assert doc["model"] == "fixture:icl-tiny" and doc["induction_heads"], capsys.readouterr().out
    assert any(entry["feeders"] for entry in doc["circuit"]), doc["circuit"]
    assert all(h["ablation"] is not None for h in doc["heads"])
