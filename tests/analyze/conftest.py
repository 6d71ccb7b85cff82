"""Models and tasks shared by the analysis tests."""

from __future__ import annotations

import json

import pytest
import torch

from icl_circuits.tasks import corpus
from icl_circuits.tasks.registry import Pair, PairTask, Template
from tests.helpers import load_fixture

WORD_TEMPLATE = Template(io_sep=" w0 ", demo_sep=" w1 ", filler="w2")


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


@pytest.fixture(scope="session")
def fixture_like(tmp_path_factory):
    """``(model, folder)``: a random 2-layer GPT-2 (4 heads) on the fixture vocabulary, with corpus.json:
    the fixture format, untrained."""
    return load_fixture_like(tmp_path_factory.mktemp("fixture_like"))


@pytest.fixture(scope="session")
def word_task() -> PairTask:
    """tiny_gpt2's vocabulary is w0..w45; inputs of 1-3 words, so prompts differ in length."""
    pairs = [Pair(" ".join(f"w{3 + (i + j) % 20}" for j in range(1 + i % 3)), f"w{30 + i % 12}") for i in range(24)]
    return PairTask("words", pairs, template=WORD_TEMPLATE)


@pytest.fixture(scope="session")
def icl_tiny():
    return load_fixture("icl-tiny")
