"""The fixture-format model shared by the task tests."""

from __future__ import annotations

import json

import pytest
import torch

from icl_circuits.tasks import corpus
from icl_circuits.tasks.registry import file_tasks


@pytest.fixture(scope="session")
def fixture_like(tmp_path_factory):
    """A random 2-layer GPT-2 (2 heads) with the fixtures' tokenizer and corpus.json: the fixture format, untrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fixtures.train import build_tokenizer
    from icl_circuits import load_model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(corpus.VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=1)  # fmt: skip
    d = tmp_path_factory.mktemp("fixture_like")
    GPT2LMHeadModel(cfg).save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    (d / "corpus.json").write_text(json.dumps(corpus.CorpusConfig().to_dict()))
    return load_model(str(d), device="cpu")


@pytest.fixture(scope="session")
def bpe_gpt2(tmp_path_factory):
    """A random GPT-2 with a byte-level BPE tokenizer (GPT-2's scheme) trained on the task files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from icl_circuits import load_model

    texts = [f"{p.input} -> {p.output}\n" for t in file_tasks().values() for p in t.pairs] * 3
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(texts, trainer)
    d = tmp_path_factory.mktemp("bpe_gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_inner=32, vocab_size=tk.get_vocab_size(), n_positions=256,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(d)
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot).save_pretrained(d)
    return load_model(str(d), device="cpu")
