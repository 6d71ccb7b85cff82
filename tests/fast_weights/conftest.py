"""Models shared by the fast-weight tests: the fixture's shape untrained, and a grouped-query llama."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch


@pytest.fixture(scope="session")
def fixture_shaped(tmp_path_factory):
    """A random 2-layer GPT-2 with the fixture corpus's tokenizer (the fixture's shape, no training)."""
    from fixtures.train import FIXTURES as SPECS
    from fixtures.train import build_model, build_tokenizer
    from icl_circuits import load_model

    d = tmp_path_factory.mktemp("fixture_shaped")
    spec = replace(SPECS["icl-tiny"], n_layer=2, n_embd=32, n_inner=64)
    build_model(spec).save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    return load_model(str(d), device="cpu")


@pytest.fixture(scope="session")
def gqa_llama(tmp_path_factory):
    """A random 2-layer llama with grouped-query attention (4 heads, 2 kv heads), rotary, no biases."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fixtures.train import build_tokenizer
    from icl_circuits import load_model

    torch.manual_seed(0)  # HF initialises from the global generator
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=67, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=1)  # fmt: skip
    d = tmp_path_factory.mktemp("gqa_llama")
    LlamaForCausalLM(cfg).save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    return load_model(str(d), device="cpu")
