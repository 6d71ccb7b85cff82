"""Attribution patching (AtP) and AtP* for attention heads: all heads x positions from gradients.

AtP (Nanda 2022) replaces each exact patch of :mod:`icl_circuits.patching.exact` by its first-order
Taylor estimate around the base run. With ``M = sum_b LD_b`` (each example's logit difference
depends only on its own row, so one backward gives every example's gradient)::

    change_b(node) ~= (a_source - a_base) . dLD_b/da |_base

``direction="denoising"``: base = corrupted run, source = clean -- TransformerLens's
``tools.analysis.attribution_patch`` convention (``(a_clean - a_corrupt) . g_corrupt``; the
``z`` per-position estimates equal its ``attn_head_out`` node scores, tested). ``"noising"``:
base = clean, source = corrupted. An estimate of the patched logit difference is
``LD_base + change``, normalised exactly as exact patching (:class:`~icl_circuits.patching.exact.PatchEffects`).

AtP* (Kramár, Lieberum, Shah & Nanda 2024, arXiv:2403.00745) adds two fixes:

* **QK fix** (their §3.1.1, against attention saturation): a query or key patch is not linearised
  through the softmax. The patched pattern ``A'`` is recomputed exactly -- ``softmax(q' k^T / sqrt(d))``
  for queries (query ``t`` only changes row ``t``), and for a key at position ``s`` each row with only
  logit ``s`` changed -- and only the pattern -> metric step is linear::

      change_b(q or k node) ~= sum_{t,s} (A'_ts - A_ts) dLD_b/dA_ts

  For a head's output over all positions the estimate is split as the paper does into a value
  path and an exact-softmax QK path, ``sum_t g_t . sum_s A_ts (v'_s - v_s)`` and
  ``sum_{t,s} (A'_ts - A_ts) g_t . v'_s`` (``A'`` with both ``q`` and ``k`` patched, ``g_t = dLD/dz_t``).
  Their sum is exactly ``(z' - z) . g`` -- the head's own softmax is already exact in AtP on ``z``
  -- so for ``z`` the fix changes nothing and the split (``qk_term``) says *how* a head acts:
  through where it attends or through what it moves. ``v``, ``pattern`` and per-position ``z`` need no fix.
* **GradDrop** (§3.1.2, against cancellation between paths): for each layer ``l`` one more backward
  pass with the gradient into layer ``l``'s residual-stream writes (``hook_attn_out`` and
  ``hook_mlp_out``) set to zero, i.e. every path through layer ``l``'s attention and MLP cut;
  ``atp_star = sum_l |change^{GD_l}| / (L - 1)``, with the QK-fixed estimator in every pass. For a node
  in layer ``k`` the ``l = k`` term is 0 (its own write is cut), ``l < k`` terms equal ``|AtP|`` and
  ``l > k`` terms drop one later layer. It is an **unsigned** magnitude (per example, averaged over the
  batch): compare it with ``|exact effect|`` (:meth:`AtPResult.agreement`).

Cost: one forward of the source batch, one forward + backward of the base batch (AtP), ``L`` more
backwards for GradDrop, and the QK fix's ``O(H pos^2 d_head)`` per layer (``O(H pos^3)`` for keys
per position). Only what the estimator reads is cached (:func:`_needed`: plain AtP on ``z`` per position
caches ``z`` and its gradient; the QK split of ``z`` adds ``v`` and ``pattern``). Gradients are captured with
backward hooks inside ``model.hooks(...)`` and driven by ``torch.autograd.grad`` from a detached copy of the
first residual, with every parameter's ``requires_grad`` off meanwhile, so no weight gradient is computed or
prepared and no ``.grad`` is touched. Neither run builds the ``[batch, pos, d_vocab]`` logits: the source run's
unembedding sees the answer positions only, the base run stops at ``ln_final`` (:func:`_forward_cache`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from icl_circuits.errors import InputError
from icl_circuits.models.attention import score_vectors
from icl_circuits.patching.exact import Direction, PatchEffects, aligned_slots, check_inputs
from icl_circuits.patching.resume import fused_activations, unembed_ld
from icl_circuits.results import PALETTE, Result
from icl_circuits.shapes import expand_kv
from icl_circuits.tasks.roles import PromptRoles, RoleSlots

HEAD_ACTIVATIONS = ("z", "q", "k", "v", "pattern")
ESTIMATORS = ("atp", "atp_qk", "atp_star")


# ---------------------------------------------------------------- correlation (no scipy at runtime)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), as ``scipy.stats.rankdata``."""
    x = x.double().reshape(-1)
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.double, device=x.device)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=torch.double, device=x.device).scatter_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two equally shaped tensors (flattened); NaN when either is constant."""
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    if x.shape != y.shape or len(x) < 2:
        raise InputError(f"need two equal-length series of >= 2 values, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x - x.mean(), y - y.mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(_ranks(x), _ranks(y.reshape(-1)))


@dataclass(frozen=True)
class Agreement(Result):
    """How well each estimator tracks exact patching over the grid cells.

    Signed estimators (``atp``, ``atp_qk``) are compared with the exact batch-normalised effect;
    the unsigned ``atp_star`` (GradDrop) with its absolute value.
    """

    n_cells: int
    pearson: dict[str, float]
    spearman: dict[str, float]

    title = "Agreement of the estimators with exact patching"

    def to_dict(self) -> dict[str, Any]:
        return {"n_cells": self.n_cells, "pearson": dict(self.pearson), "spearman": dict(self.spearman)}

    def plot(self) -> Any:
        """Pearson and Spearman correlation of each estimator with exact patching (bars)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        for i, (what, vals) in enumerate((("Pearson", self.pearson), ("Spearman", self.spearman))):
            fig.add_bar(name=what, x=list(vals), y=list(vals.values()), marker_color=PALETTE[i])
        fig.update_layout(title=f"{self.title} ({self.n_cells} cells)", barmode="group", yaxis_title="correlation",
                          yaxis_range=[-1.05, 1.05], xaxis_title="estimator")  # fmt: skip
        return fig

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(
            [{"estimator": k, "compared_with": "|exact|" if k == "atp_star" else "exact", "pearson": v,
              "spearman": self.spearman[k], "n_cells": self.n_cells} for k, v in self.pearson.items()]
        )  # fmt: skip

    def _repr_html_(self) -> str:
        from icl_circuits.report import table_html

        return table_html(self.to_dataframe())


# ---------------------------------------------------------------- result


@dataclass(frozen=True)
class AtPResult(Result):
    """Estimated changes of the logit difference, ``[*grid, batch]`` over ``axis_names``.

    ``atp``: plain AtP (signed). ``atp_qk``: with the QK fix (signed; equals ``atp`` except for
    ``q``/``k``). ``atp_star``: QK fix + GradDrop (unsigned magnitude; ``None`` when not computed).
    ``qk_term``: for head outputs over all positions, the part of ``atp_qk`` due to the pattern change
    (``None`` where attention is not ``softmax(q.k / sqrt(d)) @ v``, e.g. attention soft-capping: ``notes`` says so).
    """

    activation: str
    direction: str
    axis_names: tuple[str, ...]
    atp: torch.Tensor
    atp_qk: torch.Tensor
    atp_star: torch.Tensor | None
    qk_term: torch.Tensor | None
    clean_logit_diff: torch.Tensor
    corrupted_logit_diff: torch.Tensor
    notes: tuple[str, ...] = ()  # what this model did not allow (e.g. no QK split), said in words
    labels: tuple[str, ...] = ()  # the role slots' names when the position axis is "role"

    @property
    def _base_ld(self) -> torch.Tensor:
        return self.corrupted_logit_diff if self.direction == "denoising" else self.clean_logit_diff

    def estimate(self, kind: str = "atp_qk") -> PatchEffects:
        """A signed estimator as :class:`PatchEffects` (patched LD = base LD + change): same statistics and plots."""
        if kind not in ("atp", "atp_qk"):
            raise InputError(f"only the signed estimators 'atp' and 'atp_qk' estimate a patched run, got {kind!r}")
        change = self.atp if kind == "atp" else self.atp_qk
        return PatchEffects(self.activation, self.direction, self.axis_names, self._base_ld + change,
                            self.clean_logit_diff, self.corrupted_logit_diff, method=kind,
                            labels=self.labels)  # fmt: skip

    def magnitude(self) -> PatchEffects:
        """AtP* (unsigned) as :class:`PatchEffects`: patched LD = ``LD_base + sign(mean gap) |change|``, so its
        :meth:`~PatchEffects.effect` is :meth:`normalised` ``("atp_star")``, ``mean |change| / |mean gap|``, with the
        same bootstrap interval and plots as the signed estimators."""
        if self.atp_star is None:
            raise InputError("GradDrop was not computed; call attribution_patch(..., graddrop=True)")
        sign = 1.0 if float((self.clean_logit_diff - self.corrupted_logit_diff).mean()) >= 0 else -1.0
        return PatchEffects(self.activation, self.direction, self.axis_names, self._base_ld + sign * self.atp_star,
                            self.clean_logit_diff, self.corrupted_logit_diff, method="atp*",
                            labels=self.labels)  # fmt: skip

    def normalised(self, kind: str = "atp_qk") -> torch.Tensor:
        """``[*grid]``: batch-normalised estimated effect, ``mean_b change_b / mean_b (LD_clean - LD_corrupted)``;
        for ``atp_star`` the magnitude over ``|mean gap|``."""
        gap = float((self.clean_logit_diff - self.corrupted_logit_diff).mean())
        if kind == "atp_star":
            if self.atp_star is None:
                raise InputError("GradDrop was not computed; call attribution_patch(..., graddrop=True)")
            return self.atp_star.mean(-1) / abs(gap)
        if kind not in ESTIMATORS:
            raise InputError(f"kind must be one of {ESTIMATORS}, got {kind!r}")
        return (self.atp if kind == "atp" else self.atp_qk).mean(-1) / gap

    def agreement(self, exact: PatchEffects) -> Agreement:
        """Pearson and Spearman correlation of each estimator with exact patching of the same cells."""
        if (
            exact.activation != self.activation
            or exact.direction != self.direction
            or exact.grid_shape != tuple(self.atp.shape[:-1])
        ):
            raise InputError(
                f"exact patching ({exact.activation}, {exact.direction}, grid {list(exact.grid_shape)}) does not "
                f"match this estimate ({self.activation}, {self.direction}, grid {list(self.atp.shape[:-1])})"
            )
        eff = exact.effect()
        kinds = [k for k in ESTIMATORS if k != "atp_star" or self.atp_star is not None]
        targets = {k: eff.abs() if k == "atp_star" else eff for k in kinds}
        return Agreement(
            n_cells=eff.numel(),
            pearson={k: pearson(self.normalised(k), targets[k]) for k in kinds},
            spearman={k: spearman(self.normalised(k), targets[k]) for k in kinds},
        )

    def to_dataframe(self) -> Any:
        """One row per grid cell: the batch-normalised estimate of each estimator (and ``qk_term``)."""
        import pandas as pd

        est = self.estimate("atp")
        cells = est.cells()
        cols = {k: self.normalised(k).reshape(-1) for k in ESTIMATORS if k != "atp_star" or self.atp_star is not None}
        if self.qk_term is not None:
            gap = float((self.clean_logit_diff - self.corrupted_logit_diff).mean())
            cols["qk_term"] = self.qk_term.mean(-1).reshape(-1) / gap
        rows = [{**est.cell_columns(c), **{k: float(v[i]) for k, v in cols.items()}}
                for i, c in enumerate(cells)]  # fmt: skip
        return pd.DataFrame(rows)

    title = "Attribution patching (AtP)"

    def to_dict(self) -> dict[str, Any]:
        """Per-example estimated changes ``[*grid, batch]`` (nested lists) and the logit differences."""
        return {
            "activation": self.activation, "direction": self.direction, "axis_names": list(self.axis_names),
            "atp": self.atp.tolist(), "atp_qk": self.atp_qk.tolist(),
            "atp_star": None if self.atp_star is None else self.atp_star.tolist(),
            "qk_term": None if self.qk_term is None else self.qk_term.tolist(),
            "clean_logit_diff": self.clean_logit_diff.tolist(),
            "corrupted_logit_diff": self.corrupted_logit_diff.tolist(), "notes": list(self.notes),
            **({"labels": list(self.labels)} if self.labels else {}),
        }  # fmt: skip

    def plot(self, kind: str = "atp_qk") -> Any:
        """Heatmap of a signed estimator (as :meth:`PatchEffects.plot`)."""
        return self.estimate(kind).plot()

    def summary(self) -> str:
        has = "AtP, AtP+QK fix" + (", AtP* (GradDrop)" if self.atp_star is not None else "")
        return f"{has} for {self.activation} ({self.direction}), grid {self.axis_names} {list(self.atp.shape[:-1])}"

    def _repr_html_(self) -> str:
        import html

        from icl_circuits.report import table_html

        df = self.to_dataframe()
        df = df.reindex(df["atp_qk"].abs().sort_values(ascending=False).index)
        return f"<div><pre>{html.escape(self.summary())}</pre>{table_html(df, max_rows=12)}</div>"


# ---------------------------------------------------------------- forward and backward passes


_KINDS = ("z", "q", "k", "v", "pattern", "attn_scores", "rot_q", "rot_k", "cos", "sin", "q_normed", "k_normed")


def _names(l: int, kinds: tuple[str, ...] = _KINDS) -> dict[str, str]:
    a = f"blocks.{l}.attn."
    return {k: a + f"hook_{k}" for k in kinds}


def _needed(activation: str, per_position: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(kinds cached in both forwards, kinds whose gradients are captured)`` for ``activation``.

    Plain AtP needs ``a`` from both runs and ``da``. The QK split of ``z`` (all positions) also needs ``v`` and
    ``pattern`` (the source run's pattern *is* the pattern with both ``q`` and ``k`` patched); the QK fix of ``q``/``k``
    recomputes patterns from the score vectors (rotary inputs where the model has them), reads ``dLD/dpattern``
    and checks the scores, ``z`` and ``v`` (:func:`_check_attention`)."""
    if activation == "z":
        return (("z",), ("z",)) if per_position else (("z", "v", "pattern"), ("z",))
    if activation in ("v", "pattern"):
        return (activation,), (activation,)
    return _KINDS, (activation, "pattern")


class _Stop(Exception):
    """Raised by the ``ln_final.hook_out`` hook: the forward ends there, before the unembedding."""


@contextlib.contextmanager
def _no_param_grads(model: Any) -> Iterator[None]:
    """Every parameter ``requires_grad_(False)`` while open (restored on exit, also on error): the base forward
    then saves no inputs for weight gradients, which AtP never takes (only activation gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@dataclass(frozen=True)
class _Readout:
    """The logit difference at each example's answer position: ``rows``/``positions [batch]``, token ids ``[batch]``."""

    model: Any
    rows: torch.Tensor
    positions: torch.Tensor
    answer: torch.Tensor
    contrast: torch.Tensor

    def at(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, ...] -> [batch, ...]``: each example's answer position."""
        return x[self.rows, self.positions]

    def from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """``[batch]`` LD from the answer positions' logits ``[batch, d_vocab]``."""
        return logits[self.rows, self.answer] - logits[self.rows, self.contrast]

    def from_normed(self, normed: torch.Tensor) -> torch.Tensor:
        """``[batch]`` LD from the final normed residual at the answer positions ``[batch, d_model]``: two columns of
        ``W_U`` (+ ``b_U``, soft-cap; :func:`~icl_circuits.patching.resume.unembed_ld`), no vocabulary product."""
        return unembed_ld(self.model, normed, self.answer, self.contrast)


def _forward_cache(
    model: Any,
    tokens: torch.Tensor,
    names: list[str],
    out: _Readout,
    notes: list[str] | None = None,
    *,
    sliced: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, bool]:
    """No-grad forward caching ``names`` (present hook points) and ``LD [batch]`` from the model's own logits.

    ``sliced``: the ``ln_final.hook_out`` hook hands the unembedding only the answer positions (``[batch, 1,
    d_model]``), so the model's own unembedding (and any logit soft-cap or scale after it) runs on ``batch`` rows
    instead of ``batch x pos``. Also returns whether :meth:`_Readout.from_normed` reproduces that ``LD``: then the
    base run may stop at ``ln_final``. Where it does not (an unembedding transform this module does not
    reproduce; ``notes`` says so) or the slice does not go through, the forward is redone whole."""
    acts: dict[str, torch.Tensor] = {}
    final: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(t: torch.Tensor, hook: Any) -> None:
            acts[name] = t.detach().clone()

        return hook

    def slice_final(x: torch.Tensor, hook: Any) -> torch.Tensor:
        final["normed"] = out.at(x).detach()
        return final["normed"][:, None]

    hooks: list[tuple[str, Any]] = [(n, make(n)) for n in names]
    sliced = sliced and "ln_final.hook_out" in model.hook_dict
    if sliced:
        hooks.append(("ln_final.hook_out", slice_final))
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(tokens)
    except Exception:  # noqa: BLE001 - the slice did not go through this model: redo the forward whole
        if not sliced:
            raise
        return _forward_cache(model, tokens, names, out, notes, sliced=False)
    if not sliced:
        return acts, out.from_logits(out.at(logits)).float(), False
    if logits.ndim != 3 or logits.shape[:2] != (tokens.shape[0], 1):
        return _forward_cache(model, tokens, names, out, notes, sliced=False)
    ld = out.from_logits(logits[:, 0])
    gap = float((out.from_normed(final["normed"]) - ld).abs().max())
    if not gap <= 1e-4 * (1.0 + float(ld.abs().max())):
        if notes is not None:
            notes.append(f"the logits are not ln_final.hook_out @ W_U (+ b_U, soft-cap) on this model (LD "
                         f"gap {gap:.2e}: an unembedding transform); gradients taken through the full logits")
        return _forward_cache(model, tokens, names, out, None, sliced=False)
    return acts, ld.float(), True


def _backward_passes(
    model: Any,
    tokens: torch.Tensor,
    names: list[str],
    grad_names: list[str],
    out: _Readout,
    drops: list[int | None],
    consume: Callable[[int | None, dict[str, torch.Tensor], dict[str, torch.Tensor]], None],
    progress: bool,
    cheap_ld: bool,
) -> torch.Tensor:
    """One forward of the base run caching ``names``, then one backward per entry of ``drops`` (``None``: plain;
    ``l``: gradient into layer ``l``'s attention and MLP writes zeroed) capturing the gradients at ``grad_names``,
    each handed to ``consume(drop, grads, acts)``. ``cheap_ld``: the forward stops at ``ln_final.hook_out`` and
    ``LD`` comes from its answer/contrast columns (no ``[batch, pos, d_vocab]`` logits, verified on the source
    run by :func:`_forward_cache`). Parameters do not require grad meanwhile. Returns the base run's ``LD [batch]``."""
    acts: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {"drop": None, "leaf": None}

    def leaf_hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        state["leaf"] = x.detach().requires_grad_(True)
        return state["leaf"]

    def fwd(name: str) -> Callable[..., None]:
        def hook(t: torch.Tensor, hook: Any) -> None:
            acts[name] = t.detach().clone()

        return hook

    def bwd(name: str) -> Callable[..., None]:
        def hook(g: torch.Tensor, hook: Any) -> None:
            grads[name] = g.detach().clone()

        return hook

    cut_fired: set[str] = set()

    def cut(layer: int) -> Callable[..., torch.Tensor | None]:
        def hook(g: torch.Tensor, hook: Any) -> torch.Tensor | None:
            if state["drop"] != layer:
                return None
            cut_fired.add(hook.name)
            return torch.zeros_like(g)

        return hook

    def stop(x: torch.Tensor, hook: Any) -> None:
        state["normed"] = x
        raise _Stop

    hook_dict = model.hook_dict  # a property that rebuilds its alias table on every access: read it once
    fwd_hooks = [("blocks.0.hook_resid_pre", leaf_hook), *((n, fwd(n)) for n in names)]
    bwd_hooks: list[tuple[str, Any]] = [(n, bwd(n)) for n in grad_names]
    for l in {d for d in drops if d is not None}:
        for name in (f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"):
            if name not in hook_dict:
                raise InputError(f"GradDrop cuts layer {l}'s attention and MLP writes, but this model has no {name}")
            bwd_hooks.append((name, cut(l)))
    if cheap_ld:
        fwd_hooks.append(("ln_final.hook_out", stop))
    with torch.enable_grad(), _no_param_grads(model), model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
        try:
            ld = out.from_logits(out.at(model(tokens)))
        except _Stop:  # LD from the final normed residual: no [batch, pos, d_vocab] logits, forward or backward
            ld = out.from_normed(out.at(state["normed"]))
        total = ld.sum()
        for i, drop in enumerate(tqdm(drops, desc="AtP backward passes", unit="pass", disable=not progress)):
            state["drop"] = drop
            grads.clear()
            torch.autograd.grad(total, state["leaf"], retain_graph=i < len(drops) - 1)
            missed = [n for n in (f"blocks.{drop}.hook_attn_out", f"blocks.{drop}.hook_mlp_out")
                      if drop is not None and n not in cut_fired]  # fmt: skip
            if missed:  # the cut would silently do nothing: the write does not pass through that hook
                raise InputError(f"GradDrop: the gradient never passed {missed} on this model, so layer {drop}'s "
                                 "writes cannot be cut there; use graddrop=False")  # fmt: skip
            consume(drop, dict(grads), acts)
    return ld.detach().float()


# ---------------------------------------------------------------- estimators, one layer at a time


@dataclass
class _Layer:
    """One layer's base and source activations (``qe``/``ke``: the vectors whose dot gives the scores)."""

    base: dict[str, torch.Tensor]
    src: dict[str, torch.Tensor]
    scale: float
    group: int  # query heads per key/value head
    softcapped: bool = False  # cfg.attn_scores_soft_cap > 0: scores = cap tanh(q.k * scale / cap)

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, n_kv, d] -> [batch, pos, n_heads, d]``."""
        return expand_kv(t, t.shape[2] * self.group, dim=2)

    def pattern(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T * scale)`` with the base run's mask: ``[batch, head, q_pos, k_pos]``."""
        scores = torch.einsum("bqhd,bkhd->bhqk", q, self.expand(k)) * self.scale
        return torch.softmax(scores.masked_fill(~torch.isfinite(self.base["attn_scores"]), float("-inf")), dim=-1)

    def kv_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum the query-head axis (axis 1 of ``[batch, head, ...]``) within each key/value group."""
        return t.reshape(t.shape[0], -1, self.group, *t.shape[2:]).sum(2) if self.group > 1 else t


def _layer(model: Any, base: dict[str, torch.Tensor], src: dict[str, torch.Tensor], l: int,
           kinds: tuple[str, ...]) -> _Layer:  # fmt: skip
    """Layer ``l``'s cached ``kinds`` (see :func:`_needed`); with ``q`` and ``k`` among them also ``qe``/``ke``, the
    query/key as they enter the scores (:func:`~icl_circuits.models.attention.score_vectors`: ``hook_rot_q/k`` where
    they fire, else rotated here)."""
    names = _names(l)
    core: list[str] = [k for k in ("z", "q", "k", "v", "pattern", "attn_scores") if k in kinds]
    missing = [names[k] for k in core if names[k] not in base or names[k] not in src]
    if missing:
        raise InputError(f"these hook points did not fire on this model: {missing[:4]}; AtP needs them")
    b: dict[str, torch.Tensor] = {k: base[names[k]] for k in core}
    s: dict[str, torch.Tensor] = {k: src[names[k]] for k in core}
    if "q" in kinds and "k" in kinds:
        (b["qe"], b["ke"]), (s["qe"], s["ke"]) = score_vectors(model, base, l), score_vectors(model, src, l)
    heads = b["pattern"].shape[1] if "pattern" in b else b[core[0]].shape[2]  # query heads (v, k: kv heads)
    kv = b["v"].shape[2] if "v" in b else b["k"].shape[2] if "k" in b else heads
    d_head = b["q"].shape[-1] if "q" in b else model.cfg.d_head
    return _Layer(
        base=b,
        src=s,
        scale=float(d_head) ** -0.5,
        group=int(heads) // int(kv),
        softcapped=float(getattr(model.cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0,
    )


def _linear(d: _Layer, act: str, g: dict[str, torch.Tensor], per_position: bool) -> torch.Tensor:
    """Plain AtP: ``(a_src - a_base) . g`` -> ``[batch, pos, head]`` or ``[batch, head]``."""
    delta = d.src[act] - d.base[act]
    if act == "pattern":
        out = (delta * g[act]).sum(-1).transpose(1, 2)  # [batch, dest_pos, head]
    else:
        out = (delta * g[act]).sum(-1)  # [batch, pos, head]
    return out if per_position else out.sum(1)


def _qk_fixed(
    d: _Layer, act: str, g: dict[str, torch.Tensor], per_position: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """AtP with the QK fix: ``(estimate, qk_term or None)`` shaped like :func:`_linear`."""
    if act in ("v", "pattern") or (act == "z" and per_position):
        return _linear(d, act, g, per_position), None
    a = d.base["pattern"]
    if act == "z":  # value path + exact-softmax QK path, all positions; A' (q and k patched) = the source pattern
        gz = g["z"]
        v_src, v_base = d.expand(d.src["v"]), d.expand(d.base["v"])
        value = torch.einsum("bhqk,bqhd,bkhd->bh", a, gz, v_src - v_base)
        qk = torch.einsum("bhqk,bqhd,bkhd->bh", d.src["pattern"] - a, gz, v_src)
        return value + qk, qk
    qb, kb, qs, ks = d.base["qe"], d.base["ke"], d.src["qe"], d.src["ke"]
    grad_a = g["pattern"]
    if act == "q":  # row t depends on q_t only: one recomputed pattern gives every position
        rows = ((d.pattern(qs, kb) - a) * grad_a).sum(-1).transpose(1, 2)  # [batch, pos, head]
        return (rows if per_position else rows.sum(1)), None
    if not per_position:  # every key of a head patched at once
        return d.kv_sum(((d.pattern(qb, ks) - a) * grad_a).sum((-1, -2))), None
    scores = d.base["attn_scores"]
    new_col = torch.einsum("bqhd,bkhd->bhqk", qb, d.expand(ks)) * d.scale
    out = []
    for s in range(scores.shape[-1]):  # key s patched alone: column s of the logits changes
        mod = scores.clone()
        mod[..., s] = torch.where(torch.isfinite(scores[..., s]), new_col[..., s], scores[..., s])
        out.append(d.kv_sum(((torch.softmax(mod, dim=-1) - a) * grad_a).sum((-1, -2))))
    return torch.stack(out, dim=1), None  # [batch, pos, kv_head]


def _check_attention(d: _Layer, layer: int) -> None:
    """The QK fix assumes ``scores = q.k * scale`` and ``z = pattern @ v``; refuse a model where they fail.

    Where ``q``/``k`` were not cached (the QK split of ``z``, which reads the source run's pattern instead of
    recomputing it) only ``z = pattern @ v`` is checked, and soft-capped scores are refused from the config."""
    z = torch.einsum("bhqk,bkhd->bqhd", d.base["pattern"], d.expand(d.base["v"]))
    zgap = float((z - d.base["z"]).abs().max())
    gap, bad = float("nan"), d.softcapped
    if "qe" in d.base:
        scores = d.base["attn_scores"]
        ours = torch.einsum("bqhd,bkhd->bhqk", d.base["qe"], d.expand(d.base["ke"])) * d.scale
        ok = torch.isfinite(scores)
        gap = float((ours - scores)[ok].abs().max())
        bad = gap > 1e-3 * (1.0 + float(scores[ok].abs().max()))
    if bad or zgap > 1e-3 * (1.0 + float(d.base["z"].abs().max())):
        why = " (attention soft-capping)" if d.softcapped else ""
        raise InputError(
            f"layer {layer}{why}: attention is not softmax(q.k / sqrt(d_head)) @ v on this model (score gap {gap:.1e}, "
            f"output gap {zgap:.1e}), so the QK fix does not apply; use plain AtP on 'z' or exact patching"
        )


def attribution_patch(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    answer_tokens: torch.Tensor,
    contrast_tokens: torch.Tensor,
    activation: str = "z",
    *,
    per_position: bool = False,
    direction: Direction = "denoising",
    answer_positions: torch.Tensor | None = None,
    graddrop: bool = True,
    fast_activations: bool = True,
    progress: bool = False,
    roles: PromptRoles | RoleSlots | None = None,
    same_layout: bool = False,
) -> AtPResult:
    """AtP, AtP with the QK fix and AtP* (GradDrop) estimates for every head of ``activation``.

    Arguments as :func:`icl_circuits.patching.exact.activation_patch` (same grid: ``(layer, head)``, or
    ``(layer, pos, head)`` with ``per_position``; ``k``/``v`` per key/value head); ``activation`` is
    one of ``z``, ``q``, ``k``, ``v``, ``pattern``. ``graddrop=False`` skips the ``L`` extra backwards;
    ``fast_activations``, ``roles`` and ``same_layout`` as in
    :func:`~icl_circuits.patching.exact.activation_patch`: with ``per_position`` and ``roles`` the grid is
    ``(layer, role, head)``, each slot's estimate the sum of its positions' estimates per prompt -- AtP's
    linear estimate of patching them together; with the QK fix (``q``/``k``) the per-position fixes
    summed, not one joint fix (``notes`` says so); AtP*'s GradDrop
    magnitude is taken of that sum, per dropped layer.

    Raises:
        InputError: malformed inputs, (QK fix) attention that is not ``softmax(q.k/sqrt(d)) @ v``, or
            per-position estimates of prompts whose positions do not align (different lengths, no ``roles``).
    """
    if activation not in HEAD_ACTIVATIONS:
        raise InputError(f"activation must be one of {HEAD_ACTIVATIONS}, got {activation!r}")
    positions = check_inputs(model, clean_tokens, corrupted_tokens, answer_tokens, contrast_tokens,
                             answer_positions, direction)  # fmt: skip
    slots = None
    if per_position:
        slots = aligned_slots(roles, positions, tuple(clean_tokens.shape), f"AtP of {activation}", same_layout)
    n_layers = int(model.cfg.n_layers)
    if graddrop and n_layers < 2:
        raise InputError("GradDrop needs at least 2 layers (it averages over the other layers); pass graddrop=False")
    denoising = direction == "denoising"
    base_tokens, src_tokens = (corrupted_tokens, clean_tokens) if denoising else (clean_tokens, corrupted_tokens)
    kinds, grad_kinds = _needed(activation, per_position)
    hook_dict = model.hook_dict  # a property that rebuilds its alias table on every access: read it once
    names = [n for l in range(n_layers) for n in _names(l, kinds).values() if n in hook_dict]
    grad_names = [n for l in range(n_layers) for n in _names(l, grad_kinds).values() if n in hook_dict]
    src: dict[str, torch.Tensor] = {}
    rows = torch.arange(base_tokens.shape[0])

    out = _Readout(model, rows, positions, answer_tokens, contrast_tokens)

    results: dict[int | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    layers: list[_Layer] = []
    needs_qk = activation in ("q", "k") or (activation == "z" and not per_position)
    notes: list[str] = []
    qk_split = {"on": True}  # False: attention is not softmax(q.k)v here; for z the split is dropped, never faked

    def consume(drop: int | None, grads: dict[str, torch.Tensor], acts: dict[str, torch.Tensor]) -> None:
        if not layers:
            layers.extend(_layer(model, acts, src, l, kinds) for l in range(n_layers))
            for l, d in enumerate(layers):
                if not needs_qk:
                    break
                try:
                    _check_attention(d, l)
                except InputError as e:
                    if activation != "z":
                        raise
                    notes.append(f"{e}; plain AtP on z is unaffected, the QK split (qk_term) is not computed")
                    qk_split["on"] = False
                    break
        lin, fixed, qk = [], [], []
        for l, d in enumerate(layers):
            g = {k: grads[v] for k, v in _names(l, grad_kinds).items() if v in grads}
            for k in grad_kinds:
                g.setdefault(k, torch.zeros_like(d.base[k]))  # a path cut by GradDrop delivers no gradient
            if drop is None:
                lin.append(_linear(d, activation, g, per_position))
            est, term = (
                _qk_fixed(d, activation, g, per_position)
                if qk_split["on"]
                else (_linear(d, activation, g, per_position), None)
            )
            fixed.append(est)
            qk.append(term)
        terms = [t for t in qk if t is not None]
        results[drop] = (
            by_slot(torch.stack(lin)) if lin else torch.empty(0, device=fixed[0].device),
            by_slot(torch.stack(fixed)),
            torch.stack(terms) if len(terms) == n_layers else None,
        )

    def by_slot(t: torch.Tensor) -> torch.Tensor:
        """``[layer, batch, pos, head] -> [layer, batch, slot, head]``: each slot's positions summed per prompt."""
        if slots is None:
            return t
        onehot = torch.stack([slots.mask(s) for s in range(len(slots))], -1).to(t)  # [batch, pos, slot]
        return torch.einsum("lbph,bps->lbsh", t, onehot)

    if slots is not None and activation in ("q", "k"):
        notes.append(f"per role: the QK-fixed estimates of a slot's positions are summed (each fixed alone), not "
                     f"one joint fix of patching the slot's {activation} together")  # fmt: skip

    drops: list[int | None] = [None, *(range(n_layers) if graddrop else [])]
    with fused_activations(model, fast_activations):
        src_acts, src_ld, cheap_ld = _forward_cache(model, src_tokens, names, out, notes)
        src.update(src_acts)
        base_ld = _backward_passes(model, base_tokens, names, grad_names, out, drops, consume, progress, cheap_ld)
    clean_ld, corrupted_ld = (src_ld, base_ld) if denoising else (base_ld, src_ld)

    def grid(t: torch.Tensor) -> torch.Tensor:  # [layer, batch, (pos,) head] -> [layer, (pos,) head, batch]
        return t.movedim(1, -1).float()

    lin, fixed, qk = results[None]
    star = None
    if graddrop:
        star = torch.stack([results[l][1].abs() for l in range(n_layers)]).sum(0) / (n_layers - 1)
    return AtPResult(
        activation=activation,
        direction=direction,
        axis_names=("layer", "pos" if slots is None else "role", "head") if per_position else ("layer", "head"),
        atp=grid(lin),
        atp_qk=grid(fixed),
        atp_star=None if star is None else grid(star),
        qk_term=None if qk is None else grid(qk),
        clean_logit_diff=clean_ld,
        corrupted_logit_diff=corrupted_ld,
        notes=tuple(notes),
        labels=slots.names if slots is not None else (),
    )
