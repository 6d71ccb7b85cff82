"""load_model: every spec form, and one clear error per kind of bad spec."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import ModelSpecError, load_model, model_info
from icl_circuits.models import list_fixtures


@pytest.mark.fixture
def test_hf_dir_loads_offline_with_hooks(tiny_gpt2, tiny_gpt2_dir):
    toks = tiny_gpt2.to_tokens("w1 w2 w3")
    assert toks.tolist() == [[0, 3, 4, 5]]
    _, cache = tiny_gpt2.run_with_cache(toks)
    assert cache["blocks.1.attn.hook_pattern"].shape == (1, 4, 4, 4)
    assert cache["blocks.0.attn.hook_z"].shape == (1, 4, 4, 8)
    info = model_info(tiny_gpt2)
    assert info.kind == "hf_dir" and info.has_tokenizer and info.spec == str(tiny_gpt2_dir)


@pytest.mark.fixture
def test_hf_dir_matches_transformers_log_probs(tiny_gpt2, tiny_gpt2_dir):
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, attn_implementation="eager").eval()
    toks = torch.tensor([[0, 5, 9, 13, 5, 9]])
    ours = tiny_gpt2(toks).log_softmax(-1)
    theirs = hf(toks).logits.log_softmax(-1)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.fixture
def test_unknown_fixture_names_spec():
    with pytest.raises(ModelSpecError, match="unknown fixture 'fixture:no-such-model'"):
        load_model("fixture:no-such-model")


@pytest.mark.fixture
def test_missing_file_names_spec(tmp_path):
    missing = str(tmp_path / "nope.bin")
    with pytest.raises(ModelSpecError, match="nope.bin.*not found"):
        load_model(missing)


@pytest.mark.fixture
def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(ModelSpecError, match="tokenizer file"):
        load_model("fixture:icl-tiny", tokenizer=tmp_path / "absent.bin")


@pytest.mark.fixture
def test_hub_name_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "icl-circuits-test/not-a-cached-model"
    with pytest.raises(ModelSpecError) as info:
        load_model(spec)
    msg = str(info.value)
    assert spec in msg and "hub" in msg and "\n" not in msg


@pytest.mark.fixture
def test_folder_without_config(tmp_path):
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.unit
def test_list_fixtures_only_lists_model_folders():
    assert all(isinstance(n, str) and ":" not in n for n in list_fixtures())
