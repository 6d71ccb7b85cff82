"""Behavioural head scores on repeated random tokens (Olsson et al. 2022, "In-context Learning and Induction Heads").

Sequences are ``[BOS?, r, r, ...]``: ``r`` is ``n`` random ordinary tokens (special tokens excluded,
distinct within a sequence when the vocabulary allows), repeated ``c`` times. The BOS is there only
when the model's prompts start with one (:func:`~icl_circuits.models.uses_bos`, a per-model
setting; ``o = 1`` with it, ``0`` without): positions are ``0`` (BOS) and ``o + i*n + j`` for copy
``i`` and offset ``j``, and every function below reads ``o`` from the sequence width (``o + c*n``).
``A = blocks.{l}.attn.hook_pattern`` ``[batch, head, q, k]``. For a query ``q`` in copy ``i >= 1``:

* induction score (``c = 2``): ``A[q, q - n + 1]``, the token right after the first occurrence of the
  current token (the offset stripe), averaged over the ``n`` second-copy queries and the batch;
* prefix-matching score (Olsson et al.: attention to the tokens that followed earlier copies of the
  current token; measured on ``c >= 3`` copies): ``sum_{m=1..i} A[q, q - m*n + 1]`` -- the attention
  summed over *all* earlier "next-token" positions -- averaged over every query of copies ``1..c-1``.
  With ``c = 2`` it equals the induction score exactly; with more copies it rewards a head that
  matches on the prefix wherever it occurred, not just at the first occurrence;
* previous-token score: ``A[q, q - 1]`` averaged over all ``q >= 1``;
* duplicate-token score (``c = 2``): ``A[q, q - n]``, the earlier copy of the current token.

All four are attention fractions in ``[0, 1]`` (``1``: every query puts all its attention there).
TransformerLens's ``head_detector.detect_head(model, seq, "induction_head")`` with the default
``error_measure="mul"`` on one ``[BOS?, r, r]`` sequence divides the stripe's attention by the sum of
*all* attention (``2n + 1`` rows of 1), so ``induction_score = detect_head * (2n + 1) / n`` exactly.

In-context score (Olsson et al.'s "loss late minus loss early", on ``[BOS?, r, r]``):
``late - early`` with ``early`` the mean next-token loss (nats) on first-copy targets ``r[1..n-1]``
and ``late`` on second-copy targets ``r[1..n-1]`` (``r[0]`` is unpredictable in both copies). It is
negative when the model learns in context.

Ablation effect of head ``(l, h)`` (:mod:`icl_circuits.patching.ablation`, its sign convention): its
``hook_z`` is replaced, at every position, by its mean over the batch at that position (mean ablation
over the same repeated-token distribution), and ``effect = gain(ablated) - gain(clean)`` with the
in-context gain ``early - late`` (nats; the in-context score with the opposite sign). Sign: negative
when removing the head weakens in-context learning (the loss drop shrinks); near zero when the head
does not matter. The same runs record every later head's induction score, so
``pattern_change[S, R]`` (receiver R's induction score with sender S ablated, minus clean) says
causally which earlier heads feed each induction head.

Cost: the attention scores take two forwards (``[BOS?, r, r]`` and the ``c``-copy sequences); the
ablation sweep one captured forward, then each layer's heads tiled into one batch that resumes at
that layer from the cached residual.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from icl_circuits.errors import InputError
from icl_circuits.models import bos_offset
from icl_circuits.patching.ablation import InContextGain, read_positions


def ordinary_token_ids(model: Any) -> torch.Tensor:
    """``[n_ordinary]``: the model's vocabulary without its special tokens (BOS, EOS, PAD, UNK)."""
    d_vocab = int(model.cfg.d_vocab)
    special: set[int] = set()
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        special |= {int(i) for i in getattr(tok, "all_special_ids", []) if i is not None}
    else:
        special |= {0, 1, 2}  # llama2.c: <unk>, <s>, </s>
    return torch.tensor([i for i in range(d_vocab) if i not in special], dtype=torch.long)


def bos_token_id(model: Any) -> int:
    """The BOS id: the tokenizer's, or 1 (the llama2.c convention) for token-id-only models."""
    tok = getattr(model, "tokenizer", None)
    if tok is not None and tok.bos_token_id is not None:
        return int(tok.bos_token_id)
    return 1


def repeated_random_tokens(
    model: Any, batch: int, seq_len: int, generator: torch.Generator, *, repeats: int = 2
) -> torch.Tensor:
    """``[batch, o + repeats * seq_len]``: BOS (``o = 1``; none, ``o = 0``, for a model without one), then
    ``seq_len`` random ordinary tokens ``repeats`` times.

    Tokens are drawn without replacement within a sequence when the vocabulary allows, so every
    later-copy token has exactly one occurrence per earlier copy and the stripes are unambiguous.
    """
    if seq_len < 2 or batch < 1 or repeats < 2:
        raise InputError(
            f"need seq_len >= 2, batch >= 1 and repeats >= 2; got seq_len={seq_len}, batch={batch}, repeats={repeats}"
        )
    n_ctx = int(model.cfg.n_ctx)
    o = bos_offset(model)
    length = o + repeats * seq_len
    if length > n_ctx:
        raise InputError(
            f"seq_len={seq_len} repeated {repeats} times gives {length} tokens, more than the model's context "
            f"({n_ctx}); use seq_len <= {(n_ctx - o) // repeats}"
        )
    pool = ordinary_token_ids(model)
    if seq_len <= len(pool):
        idx = torch.stack([torch.randperm(len(pool), generator=generator)[:seq_len] for _ in range(batch)])
    else:
        idx = torch.randint(len(pool), (batch, seq_len), generator=generator)
    r = pool[idx]
    bos = torch.full((batch, o), bos_token_id(model), dtype=torch.long, device=r.device)
    return torch.cat([bos, *([r] * repeats)], dim=1)


def bos_width(width: int, seq_len: int, repeats: int) -> int:
    """``o``, the BOS offset of a ``width``-token sequence ``[BOS?, r * repeats]`` (``1``: a BOS, ``0``: none).

    Raises:
        InputError: ``width`` is neither ``repeats * seq_len`` nor one more.
    """
    o = width - repeats * seq_len
    if o not in (0, 1):
        raise InputError(
            f"a sequence of seq_len={seq_len} x {repeats} copies has {repeats * seq_len} tokens "
            f"(+1 with a BOS), got {width}"
        )
    return o


def _check_pattern(pattern: torch.Tensor, seq_len: int, repeats: int) -> int:
    """Check ``pattern [batch, head, q, k]`` fits ``[BOS?, r * repeats]``; return the BOS offset ``o``."""
    if pattern.ndim != 4 or pattern.shape[-1] != pattern.shape[-2]:
        raise InputError(f"pattern must be [batch, head, pos, pos], got {list(pattern.shape)}")
    return bos_width(int(pattern.shape[-1]), seq_len, repeats)


def induction_score(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``pattern [batch, head, q, k]`` on ``[BOS?, r, r]`` -> ``[head]``: mean of A[q, q-n+1] over the second copy."""
    _check_pattern(pattern, seq_len, 2)
    return induction_stripe(pattern, seq_len).mean(0)


def prefix_matching_score(pattern: torch.Tensor, seq_len: int, repeats: int) -> torch.Tensor:
    """``pattern [batch, head, q, k]`` on ``[BOS?, r * repeats]`` -> ``[head]``.

    For each query in copy ``i >= 1``: the attention summed over the ``i`` positions that followed
    earlier occurrences of its token (``q - m*n + 1``, ``m = 1..i``); averaged over those queries.
    """
    o = _check_pattern(pattern, seq_len, repeats)
    n = seq_len
    per_query = []
    for q in range(o + n, o + repeats * n):
        keys = torch.tensor([q - m * n + 1 for m in range(1, (q - o) // n + 1)])
        per_query.append(pattern[:, :, q, keys].sum(-1))  # [batch, head]
    return torch.stack(per_query, dim=-1).mean(dim=(0, 2))


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """``[batch, head, q, k]`` -> ``[head]``: mean of A[q, q - 1] over q >= 1."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def duplicate_token_score(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[batch, head, q, k]`` -> ``[head]``: mean of A[q, q - n] over the second copy."""
    o = _check_pattern(pattern, seq_len, 2)
    n = seq_len
    q = torch.arange(o + n, o + 2 * n)
    return pattern[:, :, q, q - n].mean(dim=(0, 2))


def _pattern_hooks(n_layers: int, fn: Callable[[int, torch.Tensor], None]) -> list[tuple[str, Callable[..., Any]]]:
    def make(layer: int) -> Callable[..., Any]:
        def hook(pattern: torch.Tensor, hook: Any) -> None:
            fn(layer, pattern.detach())

        return hook

    return [(f"blocks.{l}.attn.hook_pattern", make(l)) for l in range(n_layers)]


@torch.no_grad()
def attention_scores(
    model: Any, tokens: torch.Tensor, seq_len: int, prefix_tokens: torch.Tensor, prefix_repeats: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Attention scores of every head, each ``[layer, head]``, and the logits of the ``[BOS?, r, r]`` forward.

    ``tokens [batch, o + 2n]`` are ``[BOS?, r, r]``; ``prefix_tokens [batch', o + prefix_repeats * n']``
    the sequences for prefix matching. Scores are computed inside hooks, so no pattern is kept.
    Returns ``({"induction", "prefix_matching", "previous_token", "duplicate_token"}, logits [batch, pos, vocab])``.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    names = ("induction", "previous_token", "duplicate_token", "prefix_matching")
    out = {k: torch.full((n_layers, n_heads), float("nan")) for k in names}  # cpu: scored from .cpu() patterns
    n_prefix = prefix_tokens.shape[1] // prefix_repeats  # width o + repeats * n' with o in {0, 1}

    def on_rr(layer: int, pattern: torch.Tensor) -> None:
        pattern = pattern.float().cpu()
        out["induction"][layer] = induction_score(pattern, seq_len)
        out["previous_token"][layer] = previous_token_score(pattern)
        out["duplicate_token"][layer] = duplicate_token_score(pattern, seq_len)

    def on_prefix(layer: int, pattern: torch.Tensor) -> None:
        out["prefix_matching"][layer] = prefix_matching_score(pattern.float().cpu(), n_prefix, prefix_repeats)

    with model.hooks(fwd_hooks=_pattern_hooks(n_layers, on_rr)):
        logits = model(tokens.to(model.cfg.device))
    with model.hooks(fwd_hooks=_pattern_hooks(n_layers, on_prefix)):
        model(prefix_tokens.to(model.cfg.device))
    for k, v in out.items():
        if torch.isnan(v).any():
            raise RuntimeError(f"the {k} hook did not fire on every layer: hook_pattern missing from this bridge")
    return out, logits


def in_context_losses(logits: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits [batch, o + 2n, vocab]`` on ``[BOS?, r, r]`` -> ``(early [batch], late [batch])`` mean losses (nats).

    ``early``: predicting first-copy tokens ``r[1..n-1]``; ``late``: second-copy ``r[1..n-1]``
    (:class:`icl_circuits.patching.ablation.InContextGain`, whose metric is ``early - late``).
    """
    n = seq_len
    if tokens.ndim != 2 or tokens.shape[1] not in (2 * n, 1 + 2 * n) or logits.shape[:2] != tokens.shape:
        raise InputError(
            f"need tokens [batch, (1 +) {2 * n}] and logits of the same [batch, pos] with a vocab axis; "
            f"got {list(tokens.shape)} and {list(logits.shape)}"
        )
    gain = InContextGain(tokens.cpu(), seq_len)
    early, late = [], []
    for b in range(tokens.shape[0]):  # one sequence at a time: a 50k vocabulary costs one row of memory
        e, l = gain.losses(read_positions(logits[b : b + 1], gain.positions[:1]), slice(b, None))
        early.append(e[0])
        late.append(l[0])
    return torch.stack(early), torch.stack(late)


def in_context_score(logits: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> float:
    """Olsson et al.'s in-context score ``late - early`` (nats, batch mean); negative = learns in context."""
    early, late = in_context_losses(logits, tokens, seq_len)
    return float((late - early).mean())


def induction_stripe(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``pattern [rows, head, q, k]`` on ``[BOS?, r, r]`` -> ``[rows, head]``: each sequence's induction score."""
    n, o = seq_len, _check_pattern(pattern, seq_len, 2)
    q = torch.arange(o + n, o + 2 * n, device=pattern.device)
    return pattern[:, :, q, q - n + 1].mean(-1)
