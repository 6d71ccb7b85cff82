"""llama2.c checkpoints load through load_model and match an independent plain-torch forward."""

from __future__ import annotations

import struct

import pytest
import torch

from icl_circuits import CheckpointFormatError, ModelSpecError, NoTokenizerError, load_model
from icl_circuits.models.llama2c import load_tokenizer, read_header
from tests import llama2c_reference as ref

GREEDY_IDS = [319, 459, 355, 260, 275, 429, 339, 315, 374, 327, 446, 262, 421, 392, 275, 280, 269, 440, 270, 283]
GREEDY_TEXT = ' "Echoes of vectors unfold, a gentle hum of precision, as I sense the nodes,'


def _log_softmax_gap(model, path, tokens):
    ours = model(torch.tensor([tokens]))[0].log_softmax(-1)
    theirs = ref.forward(path, tokens).log_softmax(-1)
    return (ours - theirs).abs().max().item()


@pytest.mark.real_model
def test_aidreams_matches_reference_forward(aidreams, aidreams_paths):
    ckpt, _ = aidreams_paths
    tokens = [1] + list(range(300, 340)) + [5, 9, 400]
    assert _log_softmax_gap(aidreams, ckpt, tokens) < 1e-4


@pytest.mark.real_model
def test_aidreams_greedy_decoding_reproduces_readme(aidreams):
    ids = [1]
    with torch.no_grad():
        while len(ids) <= 40:
            ids.append(int(aidreams(torch.tensor([ids]))[0, -1].argmax()))
    assert ids[1:21] == GREEDY_IDS
    assert aidreams.tokenizer.decode(GREEDY_IDS) == GREEDY_TEXT[: len(aidreams.tokenizer.decode(GREEDY_IDS))]
    assert aidreams.tokenizer.decode(ids[1:]).startswith(GREEDY_TEXT)


@pytest.mark.real_model
def test_aidreams_tokenizer_round_trip(aidreams_paths):
    _, tok_path = aidreams_paths
    tok = load_tokenizer(tok_path, 512)
    text = "Echoes of vectors unfold, a gentle hum"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == " " + text  # llama2.c encodes with a dummy leading space
    assert ids[:3] == [388, 355, 260]  # ' E' 'cho' 'es': greedy highest-score merges


@pytest.mark.fixture
@pytest.mark.parametrize("shared,n_kv", [(False, 2), (True, 1), (False, 4)])
def test_grouped_query_checkpoint_matches_reference(tmp_path, shared, n_kv):
    path = ref.random_checkpoint(tmp_path / "gqa.bin", shared=shared, n_kv=n_kv)
    model = load_model(str(path), device="cpu")
    assert model.cfg.n_heads == 4
    tokens = [1, 7, 3, 30, 12, 7, 3, 30, 0, 39]
    assert _log_softmax_gap(model, path, tokens) < 1e-4


@pytest.mark.fixture
def test_checkpoint_without_tokenizer_rejects_strings(tmp_path):
    from icl_circuits.models import require_tokenizer

    model = load_model(str(ref.random_checkpoint(tmp_path / "m.bin")), device="cpu")
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 40)
    with pytest.raises(NoTokenizerError, match="m.bin"):
        require_tokenizer(model, "to_tokens")


@pytest.mark.fixture
def test_truncated_checkpoint(tmp_path):
    path = ref.random_checkpoint(tmp_path / "t.bin")
    data = path.read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-100])
    with pytest.raises(CheckpointFormatError, match="cut.bin.*truncated"):
        load_model(str(tmp_path / "cut.bin"))
    (tmp_path / "tiny.bin").write_bytes(data[:10])
    with pytest.raises(CheckpointFormatError, match="tiny.bin.*truncated"):
        read_header(tmp_path / "tiny.bin")


@pytest.mark.fixture
def test_header_that_disagrees_with_size(tmp_path):
    path = ref.random_checkpoint(tmp_path / "h.bin")
    data = bytearray(path.read_bytes())
    data[8:12] = struct.pack("i", 3)  # n_layers 2 -> 3: the file is now too short for the header
    (tmp_path / "bad.bin").write_bytes(bytes(data))
    with pytest.raises(ModelSpecError, match="bad.bin.*implies"):
        load_model(str(tmp_path / "bad.bin"))
    data[8:12] = struct.pack("i", 1)  # n_layers 1: trailing bytes
    (tmp_path / "long.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match="trailing bytes"):
        load_model(str(tmp_path / "long.bin"))
