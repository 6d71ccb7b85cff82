"""Small random models whose patches matter (large initial weights), for the patching and AtP tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests import llama2c_reference as ref


def random_llama2c(path: Path, *, n_kv: int = 2, seed: int = 0, n_layers: int = 2, vocab: int = 40) -> Path:
    """A llama2.c checkpoint, random weights (rotary, RMSNorm, SwiGLU; grouped-query when ``n_kv < 4``)."""
    dim, hidden, n_heads, seq_len = 32, 48, 4, 24
    rng = np.random.default_rng(seed)
    shapes = ref.shapes(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, False)
    w = {k: rng.normal(0, 0.3, size=s).astype(np.float32) for k, s in shapes.items()}
    for k in ("rms_att", "rms_ffn", "rms_final"):
        w[k] = 1 + 0.1 * w[k]
    ref.write(path, (dim, hidden, n_layers, n_heads, n_kv, -vocab, seq_len), w)
    return path


def random_gpt2(folder: Path, *, seed: int = 0, n_layers: int = 3, vocab: int = 40, init: float = 0.25) -> Path:
    """A GPT-2 (LayerNorm, learned positions, GELU) with weights drawn at ``init`` std, saved with a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["<bos>", "<pad>"] + [f"w{i}" for i in range(vocab - 2)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<pad>"
    )
    cfg = GPT2Config(n_layer=n_layers, n_head=4, n_embd=32, n_inner=64, vocab_size=vocab, n_positions=32,
                     bos_token_id=0, eos_token_id=0, initializer_range=init)  # fmt: skip
    torch.manual_seed(seed)  # Hugging Face initialises from the global generator
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_pairs(seed, batch=3, n_pos=9, vocab=40, changed=(2, 5)):
    """Random clean tokens; corrupted differs at ``changed``; answers/contrasts; ragged answer positions."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(3, vocab, (batch, n_pos), generator=g)
    corrupted = clean.clone()
    for p in changed:
        corrupted[:, p] = (clean[:, p] + torch.randint(1, vocab - 3, (batch,), generator=g) - 3) % (vocab - 3) + 3
    answer = torch.randint(3, vocab, (batch,), generator=g)
    contrast = (answer - 3 + torch.randint(1, vocab - 3, (batch,), generator=g)) % (vocab - 3) + 3
    positions = torch.full((batch,), n_pos - 1)
    positions[1:2] = n_pos - 2  # one right-padded example (when batch > 1)
    return clean, corrupted, answer, contrast, positions
