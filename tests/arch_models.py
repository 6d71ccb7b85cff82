"""Tiny random models of the architecture families the matrix covers, from Hugging Face configs (no download).

Each is 2 layers, d_model 32-64, with the fixture corpus's word-level tokenizer (``fixtures.train.build_tokenizer``: the
``fixture-*`` tasks work on them), saved with ``save_pretrained`` so :func:`icl_circuits.load_model` boots it offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 67  # the fixture corpus tokenizer (fixtures.train.build_tokenizer)
ARCHS = ("gpt2", "neox", "llama", "qwen2", "gemma2", "gemma3")


def _config(arch: str, vocab: int) -> Any:
    import transformers as tf

    common: dict[str, Any] = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    llama_like = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 64, "initializer_range": 0.3}  # fmt: skip
    if arch == "gpt2":
        return tf.GPT2Config(n_layer=2, n_head=4, n_embd=32, n_inner=64, n_positions=64, initializer_range=0.3,
                             **common)  # fmt: skip
    if arch == "neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=64, rotary_pct=0.5, use_parallel_residual=True,
                                initializer_range=0.3, **common)  # fmt: skip
    if arch == "llama":
        return tf.LlamaConfig(**llama_like, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(**llama_like, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                              **common)  # fmt: skip
    if arch == "gemma2":
        return tf.Gemma2Config(**llama_like, head_dim=8, sliding_window=8, final_logit_softcapping=3.0,
                               attn_logit_softcapping=5.0, query_pre_attn_scalar=8, **common)  # fmt: skip
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**llama_like, head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                                   layer_types=["sliding_attention", "full_attention"], **common)  # fmt: skip
    raise ValueError(f"unknown architecture {arch!r}; known: {ARCHS}")


def build(arch: str, folder: Path, *, seed: int = 0, vocab: int = VOCAB) -> Path:
    """Save a tiny random ``arch`` model and its tokenizer in ``folder``; returns ``folder``."""
    from transformers import AutoModelForCausalLM

    cfg = _config(arch, vocab)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    if arch == "qwen2":  # attention biases are zero at init: make them matter
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.normal_(0, 0.3)
    model.save_pretrained(folder)
    from fixtures.train import build_tokenizer

    build_tokenizer().save_pretrained(folder)
    build_tokenizer().save_pretrained(folder / "tokenizer")
    return folder


def load(folder: Path) -> Any:
    """``load_model(folder)`` on the CPU, with the saved word-level tokenizer: TransformerLens 4.3 reloads a
    Qwen2 folder's tokenizer as ``Qwen2Tokenizer`` (its byte-level pre-tokenizer splits ``w1`` into pieces)."""
    from transformers import PreTrainedTokenizerFast

    from icl_circuits import load_model

    model = load_model(str(folder), device="cpu")
    if type(model.tokenizer) is not PreTrainedTokenizerFast:  # a folder without config.json: no class override
        model.tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder / "tokenizer"))
    return model
