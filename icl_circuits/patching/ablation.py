"""Mean ablation of attention heads: the means, the hooks, and one sweep whose metric is a parameter.

Mean-ablating head ``(l, h)`` replaces its ``z[b, t, h]`` (``blocks.{l}.attn.hook_z``; the head's
output is ``z @ W_O[l, h]``) at every position ``t`` by ``mean_z[t, h]``, its mean over the reference
prompts that reach ``t`` (:func:`mean_z`; right-padded prompts shorter than ``t`` do not count, so with
prompts of one length it is the per-position batch mean, as TransformerLens's
``generic_activation_patch`` with ``layer_head_vector_patch_setter`` and a cache of means).

**Sign, everywhere:** ``effect = metric(ablated) - metric(clean)`` (batch means), with every metric
oriented so that *larger = the model does the behaviour better*:

* :class:`LogitDiff` -- ``logit[answer] - logit[contrast]`` at each prompt's answer position (logits);
* :class:`InContextGain` -- on ``[BOS?, r, r]`` (BOS where the model uses one): ``early - late``
  (nats), the mean next-token loss on the first-copy targets ``r[1..n-1]`` minus that on the
  second-copy targets (``r[0]`` is unpredictable in both copies); Olsson et al.'s in-context score
  ``late - early`` with the sign flipped, so positive = the model learns in context.

So **a negative effect means the head helps** (removing it hurts), 0 that it does not matter.

:func:`mean_ablation_sweep` ablates one head at a time. Cost: one captured forward of the prompts
(means, the cached residual stream, the clean metric), then the heads, layer by layer, tiled into
batches of at most ``max_rows`` rows (one copy of the prompts per head), each started at the lowest
layer among its heads from the cached residual (:mod:`icl_circuits.patching.resume`) -- one run per
layer where a layer's heads fill the rows, several small layers per run otherwise (fewer calls,
which is what a tiny model's time goes to) -- reading only what the metric needs:
one ``d_model`` dot per row for :class:`LogitDiff`, the unembedding at the read positions (in row
chunks) for :class:`InContextGain`. That is about ``H * sum_l (L - l) / L`` batch forwards of the
upper layers instead of ``L * H`` full ones. With ``pattern_score`` it also records every later
head's attention score in the same runs. An architecture whose blocks the resumed run does not
reproduce (``BaseRun.check`` and the metric's own check) gets tiled full forwards instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from icl_circuits.errors import InputError
from icl_circuits.patching.resume import (
    BaseRun,
    capture_run,
    float32_matmul,
    fused_activations,
    unembed,
    unembed_ld,
)
from icl_circuits.shapes import Head, all_heads, check_model_heads, model_shape
from icl_circuits.tasks.scoring import answer_logits, batch_chunks, padded_batch

SIGN = "effect = metric(ablated) - metric(clean); negative = the head helps"
_MAX_LOGITS = 2**25  # floats of [rows, P, d_vocab] logits unembedded at once


# ---------------------------------------------------------------- metrics


class AblationMetric(Protocol):
    """What an ablated run is scored by: one number per example, larger = the behaviour is stronger.

    ``positions [batch, P]``: the positions whose logits it reads. ``from_logits`` maps the logits at
    those positions, ``[n * batch, P, d_vocab]`` for ``n`` copy-major copies of the batch, to
    ``[n * batch]``; ``from_final`` does the same from the final normed residual
    ``[n * batch, P, d_model]`` (it may skip most of the unembedding).
    """

    @property
    def name(self) -> str: ...

    @property
    def unit(self) -> str: ...

    @property
    def positions(self) -> torch.Tensor: ...

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor: ...

    def from_final(self, final: torch.Tensor, model: Any) -> torch.Tensor: ...


def _unembed_chunks(final: torch.Tensor, model: Any, fn: Callable[[torch.Tensor, slice], torch.Tensor]) -> torch.Tensor:
    """``fn(final[rows] @ W_U + b_U, rows)`` over row chunks of ``final [rows, P, d_model]`` -> ``[rows]``."""
    per = max(1, _MAX_LOGITS // max(1, final.shape[1] * int(model.cfg.d_vocab)))
    out = []
    for lo in range(0, final.shape[0], per):
        rows = slice(lo, lo + per)
        out.append(fn(unembed(model, final[rows]), rows))  # W_U, b_U and any final-logit soft-cap
    return torch.cat(out)


@dataclass(frozen=True)
class LogitDiff:
    """``logit[answer] - logit[contrast]`` at each prompt's answer position (``answer_ids``,
    ``contrast_ids``, ``last_positions``: ``[batch]``). Larger = more of the answer."""

    answer_ids: torch.Tensor
    contrast_ids: torch.Tensor
    last_positions: torch.Tensor
    name: str = "logit_diff"
    unit: str = "logits"

    def __post_init__(self) -> None:
        n = int(self.last_positions.shape[0])
        if self.answer_ids.shape != (n,) or self.contrast_ids.shape != (n,):
            raise InputError(f"answer_ids/contrast_ids must be [{n}] like last_positions, got "
                             f"{tuple(self.answer_ids.shape)}, {tuple(self.contrast_ids.shape)}")  # fmt: skip

    @property
    def positions(self) -> torch.Tensor:
        return self.last_positions.long()[:, None]

    def _tiled(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = rows // int(self.answer_ids.shape[0])
        return self.answer_ids.long().repeat(n), self.contrast_ids.long().repeat(n)

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        a, c = self._tiled(logits.shape[0])
        rows = torch.arange(logits.shape[0])
        return (logits[rows, 0, a.to(logits.device)] - logits[rows, 0, c.to(logits.device)]).float()

    def from_final(self, final: torch.Tensor, model: Any) -> torch.Tensor:
        """``final[:, 0] . (W_U[:, a] - W_U[:, c]) + b_U[a] - b_U[c]``: two unembedding columns per row
        (each soft-capped first where the model caps its final logits:
        :func:`~icl_circuits.patching.resume.unembed_ld`)."""
        a, c = (t.to(final.device) for t in self._tiled(final.shape[0]))
        return unembed_ld(model, final[:, 0], a, c).float()


@dataclass(frozen=True)
class InContextGain:
    """``early - late`` (nats) on ``tokens [batch, o + 2n]`` = ``[BOS?, r, r]`` with ``n = seq_len``
    (``o = 1`` with a BOS, ``0`` for a model without one: read from the width).

    ``early``: mean next-token loss predicting ``r[1..n-1]`` in the first copy (logits at positions
    ``o..o+n-2``); ``late``: the same for the second copy (positions ``o+n..o+2n-2``). Larger = more
    in-context learning.
    """

    tokens: torch.Tensor
    seq_len: int
    name: str = "in_context_gain"
    unit: str = "nats"

    def __post_init__(self) -> None:
        n = self.seq_len
        if n < 2 or self.tokens.ndim != 2 or self.tokens.shape[1] not in (2 * n, 1 + 2 * n):
            raise InputError(f"need seq_len >= 2 and tokens [batch, (1 +) 2 * seq_len] = [batch, (1 +) {2 * n}] "
                             f"(1 + with a BOS), got seq_len={n}, tokens {list(self.tokens.shape)}")  # fmt: skip

    @property
    def positions(self) -> torch.Tensor:
        n = self.seq_len
        o = int(self.tokens.shape[1]) - 2 * n  # the BOS offset
        pos = torch.cat([torch.arange(o, o + n - 1), torch.arange(o + n, o + 2 * n - 1)])
        return pos.expand(self.tokens.shape[0], -1)

    def losses(self, logits: torch.Tensor, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits [rows, 2(n-1), d_vocab]`` at :attr:`positions` -> ``(early [rows], late [rows])`` in nats.

        ``rows``: which rows of the copy-major tiled batch these are (default: all, from row 0).
        """
        n, batch = self.seq_len, int(self.tokens.shape[0])
        lo = 0 if rows is None or rows.start is None else rows.start
        example = (torch.arange(logits.shape[0]) + lo) % batch
        targets = self.tokens[example][:, self.positions[0] + 1].to(logits.device)  # [rows, P]
        logp = logits.float().log_softmax(-1)
        nll = -logp.gather(-1, targets[..., None])[..., 0]
        return nll[:, : n - 1].mean(-1).cpu(), nll[:, n - 1 :].mean(-1).cpu()

    def _gain(self, logits: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        early, late = self.losses(logits, rows)
        return early - late

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        per = max(1, _MAX_LOGITS // max(1, logits.shape[1] * logits.shape[2]))
        return torch.cat([self._gain(logits[lo : lo + per], slice(lo, None)) for lo in range(0, logits.shape[0], per)])

    def from_final(self, final: torch.Tensor, model: Any) -> torch.Tensor:
        return _unembed_chunks(final, model, self._gain)


def read_positions(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``logits [rows, pos, V]`` at ``positions [batch, P]`` (tiled over the copies) -> ``[rows, P, V]``."""
    n = logits.shape[0] // positions.shape[0]
    return logits[torch.arange(logits.shape[0])[:, None], positions.to(logits.device).repeat(n, 1)]


# ---------------------------------------------------------------- means and hooks


def masked_position_sum(z: torch.Tensor, last: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``z [batch, pos, ...]`` summed over the prompts that reach each position (``t <= last[b]``):
    ``(sum [pos, ...], count [pos])`` in float32 on the CPU."""
    active = (torch.arange(z.shape[1])[None] <= last.cpu()[:, None]).float()  # [batch, pos]
    total = torch.einsum("bp,bp...->p...", active, z.float().cpu())
    return total, active.sum(0)


@torch.no_grad()
def mean_z(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    last_positions: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """``{layer: [pos, n_heads, d_head]}``: ``hook_z`` averaged over the prompts that reach each position."""
    padded, last = padded_batch(model, tokens, last_positions)
    layers = range(int(model.cfg.n_layers)) if layers is None else layers
    names = {f"blocks.{l}.attn.hook_z": l for l in layers}
    device = getattr(model.cfg, "device", None) or "cpu"
    width = padded.shape[1]
    sums: dict[int, torch.Tensor] = {}
    count = torch.zeros(width)
    for _, chunk, pos in batch_chunks(padded, last, batch_size):
        _, cache = model.run_with_cache(chunk.to(device), names_filter=lambda n: n in names)
        for n, l in names.items():
            part, c = masked_position_sum(cache[n], pos)
            total = sums.setdefault(l, torch.zeros(width, *part.shape[1:]))
            total[: chunk.shape[1]] += part
        count[: chunk.shape[1]] += c
    return {l: t / count.clamp_min(1.0)[:, None, None] for l, t in sums.items()}


def ablation_hooks(
    heads: Sequence[Head], means: dict[int, torch.Tensor], *, tile: int | None = None
) -> list[tuple[str, Any]]:
    """Forward hooks (for ``model.hooks``) that set ``z[:, t, h] = means[l][t, h]`` for every ablated head.

    ``tile=B``: the batch is tiled, one copy of ``B`` rows per entry of ``heads``, and entry ``i`` is
    ablated in copy ``i`` only (rows ``i*B .. (i+1)*B - 1``) -- one head per copy, many per forward.
    """
    by_layer: dict[int, list[tuple[slice, int]]] = {}
    for i, (l, h) in enumerate(heads):
        rows = slice(None) if tile is None else slice(i * tile, (i + 1) * tile)
        by_layer.setdefault(l, []).append((rows, h))
    missing = [l for l in by_layer if l not in means]
    if missing:
        raise InputError(f"no mean activations for layers {missing}")

    def make(l: int, cells: list[tuple[slice, int]]) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            m = means[l][: z.shape[1]].to(z.device, z.dtype)  # [pos, head, d_head]
            for rows, h in cells:
                z[rows, :, h] = m[:, h]
            return z

        return hook

    return [(f"blocks.{l}.attn.hook_z", make(l, cells)) for l, cells in by_layer.items()]


def ablated_logits(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    heads: Sequence[Head],
    *,
    last_positions: torch.Tensor | None = None,
    means: dict[int, torch.Tensor] | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """``[batch, d_vocab]`` logits at the last positions with ``heads`` mean-ablated *together* (means of
    ``tokens`` themselves unless ``means`` is given, e.g. from other prompts; they must cover the positions)."""
    heads = check_model_heads(model, heads)
    if not heads:
        return answer_logits(model, tokens, last_positions, batch_size=batch_size)
    if means is None:
        means = mean_z(model, tokens, last_positions, sorted({l for l, _ in heads}), batch_size=batch_size)
    return answer_logits(model, tokens, last_positions, batch_size=batch_size, fwd_hooks=ablation_hooks(heads, means))


# ---------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class AblationSweep:
    """What mean-ablating each head alone did (NaN: head not in the sweep).

    ``effect [layer, head]``: ``mean metric(ablated) - mean metric(clean)`` in ``unit`` (:data:`SIGN`:
    negative = the head helps). ``clean``: the clean batch mean of the metric. With a
    ``pattern_score``: ``clean_pattern [layer, head]`` (every head's score, clean) and
    ``pattern_change [layer_S, head_S, layer_R, head_R]``, receiver R's score with sender S ablated
    minus clean (exactly 0 for receivers at or below the sender's layer, which the ablation cannot
    reach) -- e.g. the causal counterpart of K-composition when the score is the induction stripe.
    ``resumed``: the runs started at the ablated layer (False: full forwards, see the module doc).
    ``per_example [layer, head, batch]``: each prompt's ``metric(ablated) - metric(clean)`` (``effect`` is
    its mean over the batch), e.g. for the sampling error of ``effect``.
    """

    metric: str
    unit: str
    effect: torch.Tensor
    clean: float
    clean_pattern: torch.Tensor | None = None
    pattern_change: torch.Tensor | None = None
    resumed: bool = True
    sign: str = SIGN
    per_example: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """``metric``, ``unit``, ``sign``, ``clean`` and ``effect`` (nested lists, ``None`` for NaN)."""
        eff = [[None if v != v else float(v) for v in row] for row in self.effect.tolist()]
        return {"metric": self.metric, "unit": self.unit, "sign": self.sign, "clean": self.clean, "effect": eff}


def _check_metric(base: BaseRun, metric: AblationMetric, clean: torch.Tensor, atol: float) -> bool:
    """Does a resumed run of the last block reproduce the metric of the full forward (2 copies)?"""
    last = base.n_layers - 1
    try:
        ours = metric.from_final(base.final_from(last, base.resid(last).repeat(2, 1, 1), positions=metric.positions),
                                 base.model).cpu()  # fmt: skip
    except Exception:  # noqa: BLE001 - any failure of the resumed run means: use full forwards
        return False
    tol = atol * (1.0 + float(clean.abs().max()))
    return bool(float((ours - clean.repeat(2)).abs().max()) <= tol)


@torch.no_grad()
def mean_ablation_sweep(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    metric: AblationMetric,
    *,
    heads: Sequence[Head] | None = None,
    last_positions: torch.Tensor | None = None,
    means: dict[int, torch.Tensor] | None = None,
    pattern_score: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_rows: int = 256,
    atol: float = 1e-4,
    fast_activations: bool = True,
    progress: bool = False,
    matmul_precision: str | None = None,
) -> AblationSweep:
    """Mean-ablate each of ``heads`` (default: all) alone on ``tokens`` and score the runs by ``metric``.

    ``tokens``: ragged lists or ``[batch, pos]`` (with ``last_positions [batch]`` for padded rows).
    ``means``: ``{layer: [pos, head, d_head]}`` from other prompts (default: these prompts', skipping
    padding). ``pattern_score``: ``pattern [rows, head, q, k] -> [rows, head]``, recorded on every
    layer's ``hook_pattern`` (clean and ablated). ``max_rows``: most rows (copies x batch) per forward.
    ``fast_activations``: GPT-2's tanh-GELU as one fused kernel while sweeping (the same function,
    :func:`icl_circuits.patching.resume.fused_activations`). The caller's tensors are not modified.
    ``matmul_precision``: torch's float32 matmul precision while sweeping
    (:func:`icl_circuits.patching.resume.float32_matmul`; ``None``: as set).

    Raises:
        InputError: a head outside the model, ``max_rows < 1``, or hook points this bridge lacks.
    """
    padded, last = padded_batch(model, tokens, last_positions)
    todo = all_heads(model) if heads is None else check_model_heads(model, heads)
    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    with fused_activations(model, fast_activations), float32_matmul(matmul_precision):
        return _sweep(model, padded, last, metric, todo, means, pattern_score, max_rows, atol, progress)


def _sweep(
    model: Any,
    padded: torch.Tensor,
    last: torch.Tensor,
    metric: AblationMetric,
    todo: list[Head],
    means: dict[int, torch.Tensor] | None,
    pattern_score: Callable[[torch.Tensor], torch.Tensor] | None,
    max_rows: int,
    atol: float,
    progress: bool,
) -> AblationSweep:
    L, H = model_shape(model)
    batch = int(padded.shape[0])
    device = getattr(model.cfg, "device", None) or "cpu"
    todo = sorted(todo)
    layers = sorted({l for l, _ in todo})
    z_names = [f"blocks.{l}.attn.hook_z" for l in layers] if means is None else []
    p_names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)] if pattern_score is not None else []
    # BaseRun.check verifies the resumed blocks on a logit difference: the last token against the next id
    probe = padded[torch.arange(batch), last]
    probe_vs = (probe + 1) % int(model.cfg.d_vocab)
    base = capture_run(model, padded.to(device), z_names + p_names, probe.to(device), probe_vs.to(device),
                       last.to(device), keep_logits=True)  # fmt: skip
    if base.logits is None:
        raise RuntimeError("capture_run did not keep the logits")
    clean = metric.from_logits(read_positions(base.logits, metric.positions)).cpu()
    base.logits = None
    if means is None:
        means = {}
        for l in layers:
            total, count = masked_position_sum(base.acts.pop(f"blocks.{l}.attn.hook_z"), last)
            means[l] = total / count.clamp_min(1.0)[:, None, None]
    clean_pattern = None
    if pattern_score is not None:
        clean_pattern = torch.stack([pattern_score(base.acts.pop(n)).float().cpu().mean(0) for n in p_names])
    try:
        base.check(atol)
        resumed = _check_metric(base, metric, clean, atol)
    except InputError:
        resumed = False

    effect = torch.full((L, H), float("nan"))
    per_example = torch.full((L, H, batch), float("nan"))
    change = torch.full((L, H, L, H), float("nan")) if pattern_score is not None else None
    per = max(1, max_rows // batch)
    jobs: list[list[Head]] = []  # adjacent whole layers packed while they fit; a layer larger than a run is split
    for l in layers:
        hs = [lh for lh in todo if lh[0] == l]
        if jobs and jobs[-1][-1][0] == l - 1 and len(jobs[-1]) + len(hs) <= per:
            jobs[-1] += hs
            continue
        jobs += [hs[i : i + per] for i in range(0, len(hs), per)]
    bar = tqdm(total=len(todo), desc=f"mean-ablating heads ({metric.name})", unit="head", disable=not progress)
    for chunk in jobs:
        l0, copies = chunk[0][0], len(chunk)
        recorded: dict[int, torch.Tensor] = {}  # receiver layer -> [copies, head]

        def record(
            layer: int, score: Callable[[torch.Tensor], torch.Tensor], into: dict[int, torch.Tensor], copies: int
        ) -> Any:
            def hook(pattern: torch.Tensor, hook: Any) -> None:
                into[layer] = score(pattern.detach()).float().cpu().reshape(copies, batch, H).mean(1)

            return hook

        hooks = ablation_hooks(chunk, means, tile=batch)
        if pattern_score is not None:
            hooks += [(p_names[r], record(r, pattern_score, recorded, copies)) for r in range(l0 + 1, L)]
        if resumed:
            final = base.final_from(l0, base.resid(l0).repeat(copies, 1, 1), hooks, positions=metric.positions)
            values = metric.from_final(final, model).cpu()
        else:  # full forwards of the tiled batch
            with model.hooks(fwd_hooks=hooks):
                logits = model(padded.to(device).repeat(copies, 1))
            values = metric.from_logits(read_positions(logits, metric.positions)).cpu()
            del logits
        rows = values.reshape(copies, batch)
        values = rows.mean(1)
        for i, (l, h) in enumerate(chunk):
            effect[l, h] = float(values[i]) - float(clean.mean())
            per_example[l, h] = rows[i] - clean
            if change is not None and clean_pattern is not None:
                change[l, h] = 0.0  # receivers at or below the ablated layer: unreachable
                for r, score in recorded.items():
                    if r > l:
                        change[l, h, r] = score[i] - clean_pattern[r]
        bar.update(len(chunk))
    bar.close()
    return AblationSweep(metric.name, metric.unit, effect, float(clean.mean()), clean_pattern, change, resumed,
                         per_example=per_example)  # fmt: skip
