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
per position). Gradients are captured with backward hooks inside ``model.hooks(...)`` and driven
by ``torch.autograd.grad`` from a detached copy of the first residual, so no parameter ``.grad``
is touched.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _names(l: int) -> dict[str, str]:
    a = f"blocks.{l}.attn."
    kinds = ("z", "q", "k", "v", "pattern", "attn_scores", "rot_q", "rot_k", "cos", "sin", "q_normed", "k_normed")
    return {k: a + f"hook_{k}" for k in kinds}


def _forward_cache(
    model: Any, tokens: torch.Tensor, names: list[str], ld_fn: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """No-grad forward caching the ``names`` that fire (rotary hooks fire only on rotary models), and ``LD``."""
    acts: dict[str, torch.Tensor] = {}

    def make(name: str) -> Callable[..., None]:
        def hook(t: torch.Tensor, hook: Any) -> None:
            acts[name] = t.detach().clone()

        return hook

    with torch.no_grad(), model.hooks(fwd_hooks=[(n, make(n)) for n in names if n in model.hook_dict]):
        ld = ld_fn(model(tokens))
    return acts, ld.float()


def _backward_passes(
    model: Any,
    tokens: torch.Tensor,
    names: list[str],
    ld_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    drops: list[int | None],
    consume: Callable[[int | None, dict[str, torch.Tensor], dict[str, torch.Tensor]], None],
    progress: bool,
    notes: list[str] | None = None,
) -> torch.Tensor:
    """One forward of the base run, then one backward per entry of ``drops`` (``None``: plain; ``l``:
    gradient into layer ``l``'s attention and MLP writes zeroed), each handed to ``consume(drop, grads,
    acts)``. Returns the base run's ``LD [batch]``."""
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

    present = [n for n in names if n in model.hook_dict]
    fwd_hooks = [("blocks.0.hook_resid_pre", leaf_hook), *((n, fwd(n)) for n in present)]
    forward_only = ("attn_scores", "rot_q", "rot_k", "hook_cos", "hook_sin", "q_normed", "k_normed")
    bwd_hooks: list[tuple[str, Any]] = [(n, bwd(n)) for n in present if not n.endswith(forward_only)]
    for l in {d for d in drops if d is not None}:
        for name in (f"blocks.{l}.hook_attn_out", f"blocks.{l}.hook_mlp_out"):
            if name not in model.hook_dict:
                raise InputError(f"GradDrop cuts layer {l}'s attention and MLP writes, but this model has no {name}")
            bwd_hooks.append((name, cut(l)))
    if "ln_final.hook_out" in model.hook_dict:  # LD from the final normed residual: no [batch, pos, d_vocab] backward
        fwd_hooks.append(("ln_final.hook_out", lambda x, hook: state.update(normed=x)))
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
        logits = model(tokens)
        ld = ld_fn(logits, None)  # from the model's real logits
        if state.get("normed") is not None:  # the cheap form, used only where it reproduces them
            cheap = ld_fn(logits, state["normed"])
            gap = float((cheap.detach() - ld.detach()).abs().max())
            if gap <= 1e-4 * (1.0 + float(ld.detach().abs().max())):
                ld = cheap
            elif notes is not None:
                notes.append(f"the logits are not ln_final.hook_out @ W_U (+ b_U, soft-cap) on this model (LD "
                             f"gap {gap:.2e}: an unembedding transform); gradients taken through the full logits")
        total = ld.sum()
        for drop in tqdm(drops, desc="AtP backward passes", unit="pass", disable=not progress):
            state["drop"] = drop
            grads.clear()
            torch.autograd.grad(total, state["leaf"], retain_graph=True)
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


def _layer(model: Any, base: dict[str, torch.Tensor], src: dict[str, torch.Tensor], l: int) -> _Layer:
    """Layer ``l``'s activations; ``qe``/``ke``: the query/key as they enter the scores
    (:func:`~icl_circuits.models.attention.score_vectors`: ``hook_rot_q/k`` where they fire, else rotated here)."""
    names = _names(l)
    pick = {k: names[k] for k in ("z", "q", "k", "v", "pattern", "attn_scores")}
    missing = [v for v in pick.values() if v not in base or v not in src]
    if missing:
        raise InputError(f"these hook points did not fire on this model: {missing[:4]}; AtP needs them")
    (qb, kb), (qs, ks) = score_vectors(model, base, l), score_vectors(model, src, l)
    n_heads, n_kv = base[names["q"]].shape[2], base[names["k"]].shape[2]
    return _Layer(
        base={**{k: base[v] for k, v in pick.items()}, "qe": qb, "ke": kb},
        src={**{k: src[v] for k, v in pick.items()}, "qe": qs, "ke": ks},
        scale=float(base[names["q"]].shape[-1]) ** -0.5,
        group=n_heads // n_kv,
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
    qb, kb, qs, ks = d.base["qe"], d.base["ke"], d.src["qe"], d.src["ke"]
    a = d.base["pattern"]
    if act == "z":  # value path + exact-softmax QK path, all positions
        gz = g["z"]
        v_src, v_base = d.expand(d.src["v"]), d.expand(d.base["v"])
        value = torch.einsum("bhqk,bqhd,bkhd->bh", a, gz, v_src - v_base)
        qk = torch.einsum("bhqk,bqhd,bkhd->bh", d.pattern(qs, ks) - a, gz, v_src)
        return value + qk, qk
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
    """The QK fix assumes ``scores = q.k * scale`` and ``z = pattern @ v``; refuse a model where they fail."""
    scores = d.base["attn_scores"]
    ours = torch.einsum("bqhd,bkhd->bhqk", d.base["qe"], d.expand(d.base["ke"])) * d.scale
    ok = torch.isfinite(scores)
    gap = float((ours - scores)[ok].abs().max())
    z = torch.einsum("bhqk,bkhd->bqhd", d.base["pattern"], d.expand(d.base["v"]))
    zgap = float((z - d.base["z"]).abs().max())
    tol = 1e-3 * (1.0 + float(scores[ok].abs().max()))
    if gap > tol or zgap > 1e-3 * (1.0 + float(d.base["z"].abs().max())):
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
    names = [n for l in range(n_layers) for n in _names(l).values()]
    src: dict[str, torch.Tensor] = {}
    rows = torch.arange(base_tokens.shape[0])

    def ld_fn(logits: torch.Tensor, normed: torch.Tensor | None = None) -> torch.Tensor:
        if normed is None:
            return logits[rows, positions, answer_tokens] - logits[rows, positions, contrast_tokens]
        return unembed_ld(model, normed[rows, positions], answer_tokens, contrast_tokens)

    results: dict[int | None, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    layers: list[_Layer] = []
    needs_qk = activation in ("q", "k") or (activation == "z" and not per_position)
    notes: list[str] = []
    qk_split = {"on": True}  # False: attention is not softmax(q.k)v here; for z the split is dropped, never faked

    def consume(drop: int | None, grads: dict[str, torch.Tensor], acts: dict[str, torch.Tensor]) -> None:
        if not layers:
            layers.extend(_layer(model, acts, src, l) for l in range(n_layers))
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
            g = {k: grads[v] for k, v in _names(l).items() if v in grads}
            for k in ("z", "q", "k", "v", "pattern"):
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
        src_acts, src_ld = _forward_cache(model, src_tokens, names, ld_fn)
        src.update(src_acts)
        base_ld = _backward_passes(model, base_tokens, names, ld_fn, drops, consume, progress, notes)
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
