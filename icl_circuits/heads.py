"""Head scan: which attention heads do in-context learning (Olsson et al. 2022; Elhage et al. 2021).

Attention scores are read from ``blocks.{l}.attn.hook_pattern`` (``[batch, head, q, k]``) on
repeated random token sequences ``[BOS, r, r]`` with ``r`` of length ``n``; positions are
``0`` (BOS), ``1..n`` (first copy) and ``n+1..2n`` (second copy). For a second-copy query at
``q = n + 1 + j``:

* induction score: attention to ``q - n + 1``, the token right after the first occurrence of the
  current token (the offset stripe), averaged over the ``n`` second-copy queries;
* previous-token score: attention to ``q - 1``, averaged over all queries ``q >= 1``;
* duplicate-token score: attention to ``q - n``, the earlier copy of the current token.
"""

from __future__ import annotations

from typing import Any

import torch

from icl_circuits.errors import InputError


def ordinary_token_ids(model: Any) -> torch.Tensor:
    """Token ids of the model's ordinary vocabulary: special tokens (BOS, EOS, PAD, UNK) excluded."""
    d_vocab = int(model.cfg.d_vocab)
    special: set[int] = set()
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        special |= {int(i) for i in getattr(tok, "all_special_ids", []) if i is not None}
    else:
        special |= {0, 1, 2}  # llama2.c: <unk>, <s>, </s>
    return torch.tensor([i for i in range(d_vocab) if i not in special], dtype=torch.long)


def bos_token_id(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    return 1  # llama2.c convention, for token-id-only models


def repeated_random_tokens(model: Any, batch: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, 1 + 2 * seq_len]``: BOS, then ``seq_len`` random ordinary tokens twice.

    Tokens are drawn without replacement within a sequence when the vocabulary allows, so every
    second-copy token has exactly one earlier occurrence and the offset stripe is unambiguous.
    """
    if seq_len < 2 or batch < 1:
        raise InputError(f"need seq_len >= 2 and batch >= 1, got seq_len={seq_len}, batch={batch}")
    n_ctx = int(model.cfg.n_ctx)
    if 1 + 2 * seq_len > n_ctx:
        raise InputError(f"seq_len={seq_len} gives {1 + 2 * seq_len} tokens, more than the context ({n_ctx})")
    pool = ordinary_token_ids(model)
    if seq_len <= len(pool):
        idx = torch.stack([torch.randperm(len(pool), generator=generator)[:seq_len] for _ in range(batch)])
    else:
        idx = torch.randint(len(pool), (batch, seq_len), generator=generator)
    r = pool[idx]
    bos = torch.full((batch, 1), bos_token_id(model), dtype=torch.long)
    return torch.cat([bos, r, r], dim=1)


def induction_score(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``pattern [batch, head, q, k]`` on ``[BOS, r, r]`` -> ``[head]``: mean of A[q, q - n + 1] over the second copy."""
    n = seq_len
    q = torch.arange(n + 1, 2 * n + 1)
    return pattern[:, :, q, q - n + 1].mean(dim=(0, 2))


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """``[batch, head, q, k]`` -> ``[head]``: mean of A[q, q - 1] over q >= 1."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def duplicate_token_score(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[batch, head, q, k]`` -> ``[head]``: mean of A[q, q - n] over the second copy."""
    n = seq_len
    q = torch.arange(n + 1, 2 * n + 1)
    return pattern[:, :, q, q - n].mean(dim=(0, 2))
