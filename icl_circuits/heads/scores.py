"""Behavioural head scores on repeated random tokens (Olsson et al. 2022, "In-context Learning and Induction Heads").

Sequences are ``[BOS, r, r, ...]``: ``r`` is ``n`` random ordinary tokens (special tokens excluded,
distinct within a sequence when the vocabulary allows), repeated ``c`` times. Positions are ``0``
(BOS) and ``1 + i*n + j`` for copy ``i`` and offset ``j``. ``A = blocks.{l}.attn.hook_pattern``
``[batch, head, q, k]``. For a query ``q`` in copy ``i >= 1``:

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
``error_measure="mul"`` on one ``[BOS, r, r]`` sequence divides the stripe's attention by the sum of
*all* attention (``2n + 1`` rows of 1), so ``induction_score = detect_head * (2n + 1) / n`` exactly.

In-context score (Olsson et al.'s "loss late minus loss early", on ``[BOS, r, r]``):
``late - early`` with ``early`` the mean next-token loss (nats) on first-copy targets ``r[1..n-1]``
and ``late`` on second-copy targets ``r[1..n-1]`` (``r[0]`` is unpredictable in both copies). It is
negative when the model learns in context.

Ablation effect of head ``(l, h)``: its ``hook_z`` is replaced, at every position, by its mean over
the batch at that position (mean ablation over the same repeated-token distribution), and
``effect = icl(ablated) - icl(clean)``. Sign: positive when removing the head weakens in-context
learning (the loss drop shrinks); near zero when the head does not matter. The same forwards record
every later head's induction score, so ``induction_change[S, R]`` (receiver R's induction score with
sender S ablated, minus clean) says causally which earlier heads feed each induction head.

Cost: the attention scores take two forwards (``[BOS, r, r]`` and the ``c``-copy sequences); the
ablation sweep costs one forward of the batch per head (``n_layers * n_heads`` in all), run as
few larger forwards that tile the batch and ablate a different head in each tile.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from icl_circuits.errors import InputError

Head = tuple[int, int]


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
    """``[batch, 1 + repeats * seq_len]``: BOS, then ``seq_len`` random ordinary tokens ``repeats`` times.

    Tokens are drawn without replacement within a sequence when the vocabulary allows, so every
    later-copy token has exactly one occurrence per earlier copy and the stripes are unambiguous.
    """
    if seq_len < 2 or batch < 1 or repeats < 2:
        raise InputError(
            f"need seq_len >= 2, batch >= 1 and repeats >= 2; got seq_len={seq_len}, batch={batch}, repeats={repeats}"
        )
    n_ctx = int(model.cfg.n_ctx)
    length = 1 + repeats * seq_len
    if length > n_ctx:
        raise InputError(
            f"seq_len={seq_len} repeated {repeats} times gives {length} tokens, more than the model's context "
            f"({n_ctx}); use seq_len <= {(n_ctx - 1) // repeats}"
        )
    pool = ordinary_token_ids(model)
    if seq_len <= len(pool):
        idx = torch.stack([torch.randperm(len(pool), generator=generator)[:seq_len] for _ in range(batch)])
    else:
        idx = torch.randint(len(pool), (batch, seq_len), generator=generator)
    r = pool[idx]
    bos = torch.full((batch, 1), bos_token_id(model), dtype=torch.long)
    return torch.cat([bos, *([r] * repeats)], dim=1)


def _check_pattern(pattern: torch.Tensor, seq_len: int, repeats: int) -> None:
    want = 1 + repeats * seq_len
    if pattern.ndim != 4 or pattern.shape[-1] != want or pattern.shape[-2] != want:
        raise InputError(
            f"pattern must be [batch, head, {want}, {want}] for seq_len={seq_len} x {repeats} copies, "
            f"got {list(pattern.shape)}"
        )


def induction_score(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``pattern [batch, head, q, k]`` on ``[BOS, r, r]`` -> ``[head]``: mean of A[q, q-n+1] over the second copy."""
    _check_pattern(pattern, seq_len, 2)
    n = seq_len
    q = torch.arange(n + 1, 2 * n + 1)
    return pattern[:, :, q, q - n + 1].mean(dim=(0, 2))


def prefix_matching_score(pattern: torch.Tensor, seq_len: int, repeats: int) -> torch.Tensor:
    """``pattern [batch, head, q, k]`` on ``[BOS, r * repeats]`` -> ``[head]``.

    For each query in copy ``i >= 1``: the attention summed over the ``i`` positions that followed
    earlier occurrences of its token (``q - m*n + 1``, ``m = 1..i``); averaged over those queries.
    """
    _check_pattern(pattern, seq_len, repeats)
    n = seq_len
    per_query = []
    for q in range(n + 1, 1 + repeats * n):
        keys = torch.tensor([q - m * n + 1 for m in range(1, (q - 1) // n + 1)])
        per_query.append(pattern[:, :, q, keys].sum(-1))  # [batch, head]
    return torch.stack(per_query, dim=-1).mean(dim=(0, 2))


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """``[batch, head, q, k]`` -> ``[head]``: mean of A[q, q - 1] over q >= 1."""
    return pattern.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))


def duplicate_token_score(pattern: torch.Tensor, seq_len: int) -> torch.Tensor:
    """``[batch, head, q, k]`` -> ``[head]``: mean of A[q, q - n] over the second copy."""
    _check_pattern(pattern, seq_len, 2)
    n = seq_len
    q = torch.arange(n + 1, 2 * n + 1)
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
    """Attention scores of every head, each ``[layer, head]``, and the logits of the ``[BOS, r, r]`` forward.

    ``tokens [batch, 1 + 2n]`` are ``[BOS, r, r]``; ``prefix_tokens [batch', 1 + prefix_repeats * n']``
    the sequences for prefix matching. Scores are computed inside hooks, so no pattern is kept.
    Returns ``({"induction", "prefix_matching", "previous_token", "duplicate_token"}, logits [batch, pos, vocab])``.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    names = ("induction", "previous_token", "duplicate_token", "prefix_matching")
    out = {k: torch.full((n_layers, n_heads), float("nan")) for k in names}
    n_prefix = (prefix_tokens.shape[1] - 1) // prefix_repeats

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
    """``logits [batch, 1 + 2n, vocab]`` on ``[BOS, r, r]`` -> ``(early [batch], late [batch])`` mean losses (nats).

    ``early``: predicting first-copy tokens ``r[1..n-1]``; ``late``: second-copy ``r[1..n-1]``.
    The log-softmax is taken one sequence at a time, so a 50k vocabulary costs one row of memory.
    """
    n = seq_len
    if tokens.ndim != 2 or tokens.shape[1] != 1 + 2 * n or logits.shape[:2] != tokens.shape:
        raise InputError(
            f"need tokens [batch, {1 + 2 * n}] and logits [batch, {1 + 2 * n}, vocab]; "
            f"got {list(tokens.shape)} and {list(logits.shape)}"
        )
    early, late = [], []
    for b in range(tokens.shape[0]):
        logp = logits[b, :-1].float().log_softmax(-1)  # [pos - 1, vocab]: position t predicts t + 1
        nll = -logp.gather(-1, tokens[b, 1:, None].to(logp.device))[:, 0].cpu()
        early.append(nll[1:n].mean())  # targets at positions 2..n
        late.append(nll[n + 1 : 2 * n].mean())  # targets at positions n + 2..2n
    return torch.stack(early), torch.stack(late)


def in_context_score(logits: torch.Tensor, tokens: torch.Tensor, seq_len: int) -> float:
    """Olsson et al.'s in-context score ``late - early`` (nats, batch mean); negative = learns in context."""
    early, late = in_context_losses(logits, tokens, seq_len)
    return float((late - early).mean())


def _heads_per_forward(batch: int, pos: int, d_vocab: int, n_total: int, max_logits: int = 2**25) -> int:
    """How many ablated copies of the batch one forward holds: logits stay under ``max_logits`` floats."""
    per_copy = batch * pos * d_vocab
    return max(1, min(n_total, max_logits // max(per_copy, 1), max(1, 1024 // batch)))


@dataclass(frozen=True)
class AblationSweep:
    """What mean-ablating each head did, head by head (NaN rows/entries: head not ablated).

    ``loss_effect [layer, head]``: ``icl(ablated) - icl(clean)`` in nats (positive: the head helps
    in-context learning). ``induction_change [layer_S, head_S, layer_R, head_R]``: the induction score
    of receiver R with sender S mean-ablated, minus its clean score -- the causal counterpart of
    K-composition: it counts every path from S to R's attention (direct, through MLPs, through
    other heads), where the weight-based composition score sees only the direct one.
    """

    loss_effect: torch.Tensor
    induction_change: torch.Tensor
    clean_induction: torch.Tensor  # [layer, head] on the same batch


def _stripe(pattern: torch.Tensor, n: int) -> torch.Tensor:
    """``[rows, head, q, k]`` -> ``[rows, head]``: per-sequence induction score."""
    q = torch.arange(n + 1, 2 * n + 1, device=pattern.device)
    return pattern[:, :, q, q - n + 1].float().mean(-1).cpu()


@torch.no_grad()
def mean_ablation_sweep(
    model: Any,
    tokens: torch.Tensor,
    seq_len: int,
    heads: Sequence[Head] | None = None,
    *,
    progress: bool = True,
    heads_per_forward: int | None = None,
) -> AblationSweep:
    """Mean-ablate each of ``heads`` (default: every head) in turn on ``tokens [batch, 1 + 2n]`` (``[BOS, r, r]``).

    Each forward tiles the batch ``k`` times and ablates a different head in each tile (``k`` from a
    logits memory budget unless ``heads_per_forward`` is given), which gives the same numbers as one
    forward per head. The caller's ``tokens`` are not modified.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    todo = [(l, h) for l in range(n_layers) for h in range(n_heads)] if heads is None else list(heads)
    for l, h in todo:
        if not (0 <= l < n_layers and 0 <= h < n_heads):
            raise InputError(f"head ({l}, {h}) is outside the model's {n_layers} layers x {n_heads} heads")
    _check_pattern(torch.empty(0, 0, tokens.shape[1], tokens.shape[1]), seq_len, 2)
    device = model.cfg.device
    tokens = tokens.to(device)
    batch, pos = tokens.shape
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(n_layers)]
    p_names = [f"blocks.{l}.attn.hook_pattern" for l in range(n_layers)]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in z_names or name in p_names)
    clean = in_context_losses(logits, tokens, seq_len)
    clean_icl = (clean[1] - clean[0]).mean()
    clean_ind = torch.stack([_stripe(cache[p_names[l]], seq_len).mean(0) for l in range(n_layers)])
    means = {l: cache[z_names[l]].mean(dim=0) for l in range(n_layers)}  # [pos, head, d_head]
    del cache, logits

    k = heads_per_forward or _heads_per_forward(batch, pos, int(model.cfg.d_vocab), len(todo))
    effects = torch.full((n_layers, n_heads), float("nan"))
    ind_change = torch.full((n_layers, n_heads, n_layers, n_heads), float("nan"))
    chunks = [todo[i : i + k] for i in range(0, len(todo), k)]
    for chunk in tqdm(chunks, desc="mean-ablating heads", unit="fwd", disable=not progress):
        by_layer: dict[int, list[tuple[int, int]]] = {}
        for tile, (l, h) in enumerate(chunk):
            by_layer.setdefault(l, []).append((tile, h))
        induction: dict[int, torch.Tensor] = {}  # layer -> [tiles, head]

        def ablate(layer: int, tiles: list[tuple[int, int]]) -> Callable[..., torch.Tensor]:
            def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
                z = z.clone()
                for tile, h in tiles:
                    z[tile * batch : (tile + 1) * batch, :, h, :] = means[layer][:, h, :]
                return z

            return hook

        def record(layer: int, into: dict[int, torch.Tensor], n_tiles: int) -> Callable[..., None]:
            def hook(pattern: torch.Tensor, hook: Any) -> None:
                into[layer] = _stripe(pattern.detach(), seq_len).reshape(n_tiles, batch, n_heads).mean(1)

            return hook

        fwd: list[tuple[str, Callable[..., Any]]] = [(z_names[l], ablate(l, tiles)) for l, tiles in by_layer.items()]
        fwd += [(p_names[l], record(l, induction, len(chunk))) for l in range(n_layers)]
        tiled = tokens.repeat(len(chunk), 1)
        with model.hooks(fwd_hooks=fwd):
            ablated = model(tiled)
        early, late = in_context_losses(ablated, tiled, seq_len)
        for tile, (l, h) in enumerate(chunk):
            rows = slice(tile * batch, (tile + 1) * batch)
            effects[l, h] = (late[rows] - early[rows]).mean() - clean_icl
            ind_change[l, h] = torch.stack([induction[r][tile] for r in range(n_layers)]) - clean_ind
        del ablated
    return AblationSweep(effects, ind_change, clean_ind)
