"""Exact activation patching, batched: many patches per forward, each started at its own layer.

Setting (Meng et al. 2022; Heimersheim & Nanda 2024, "How to use and interpret activation patching").
A clean and a corrupted prompt of equal length; the **logit difference** at the answer position,
``LD = logit[answer] - logit[contrast]``. A patch copies one activation (a head's output ``z``, query
``q``, key ``k``, value ``v``, attention pattern, or the residual stream at one position) from a
*source* run into a *base* run and reads the base run's ``LD``:

* ``direction="denoising"``: base = corrupted prompt, source = clean (what TransformerLens's
  ``get_act_patch_*`` functions compute with ``clean_cache``). The normalised value says how much
  of the clean behaviour the activation alone **restores**: 0 = none, 1 = all.
* ``direction="noising"``: base = clean prompt, source = corrupted. The normalised value says how
  much of the clean behaviour **remains** with the activation corrupted: 1 = the patch did nothing,
  0 = it destroyed the behaviour (below 0: pushed past the corrupted run).

Both use the same normalisation, per example ``b``::

    normalised_b = (LD_patched_b - LD_corrupted_b) / (LD_clean_b - LD_corrupted_b)

and, for the batch, the ratio of means ``(mean LD_patched - mean LD_corrupted) / (mean LD_clean -
mean LD_corrupted)`` (:meth:`PatchEffects.mean`; the gap-weighted mean of the per-example values,
robust to an example whose clean and corrupted runs barely differ), with a percentile bootstrap
interval over examples (:meth:`PatchEffects.bootstrap_ci`, seeded generator). :meth:`PatchEffects.effect`
is ``mean - baseline`` (0 = no effect in either direction).

Speed: TransformerLens runs one full forward of the batch per patch. Here every patch of layer ``l``
is one copy of the batch in a tiled forward that starts at block ``l`` from the cached residual (a
head-output patch starts after the layer's attention, adding ``(z' - z) @ W_O`` to the cached
mid-residual), runs the last block's MLP at the answer position only, and unembeds only the
answer-minus-contrast column there (:mod:`icl_circuits.patching.resume`, shortcuts verified per model); a
patch that copies a value equal to the base run's (a position before the first differing token) is
the identity and is not run. Cost of all-heads patching: ``H * B`` sequences through ``L - l``
blocks for layer ``l`` (half the model on average), no unembedding, against ``L * H`` full
forwards of ``B`` sequences with the ``[B, pos, d_vocab]`` unembedding. The numbers equal
TransformerLens's on the same inputs (tests/test_patching.py, to 1e-4); ``make bench`` times both.

Grouped-query models: ``k`` and ``v`` are patched per key/value head (``n_key_value_heads`` on the
head axis), as in TransformerLens.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from icl_circuits.errors import InputError
from icl_circuits.patching.resume import BaseRun, capture_run, fused_activations
from icl_circuits.results import Result
from icl_circuits.tasks.roles import PromptRoles, RoleSlots, role_slots

ACTIVATIONS = ("z", "q", "k", "v", "pattern", "resid_pre")
DIRECTIONS = ("denoising", "noising")
Direction = Literal["denoising", "noising"]


@dataclass(frozen=True)
class PatchEffects(Result):
    """Logit differences of patched runs, per grid cell and example, with their two baselines.

    ``patched_logit_diff [*grid, batch]`` over the axes ``axis_names`` (``("layer", "head")``,
    ``("layer", "pos", "head")`` or ``("layer", "pos")``; ``"role"`` in place of ``"pos"`` when positions
    are aligned by role, :class:`~icl_circuits.tasks.roles.RoleSlots`, then ``labels [role]`` names each
    slot); ``clean_logit_diff`` and ``corrupted_logit_diff [batch]``. ``method`` is ``"exact"`` for
    activation patching, or the name of the estimator when :mod:`icl_circuits.patching.atp` fills it with
    estimated logit differences.
    """

    activation: str
    direction: str
    axis_names: tuple[str, ...]
    patched_logit_diff: torch.Tensor
    clean_logit_diff: torch.Tensor
    corrupted_logit_diff: torch.Tensor
    method: str = "exact"
    labels: tuple[str, ...] = ()  # the role slots' names when an axis is "role"
    notes: tuple[str, ...] = ()  # what the run could not do as planned (e.g. a shortcut that raised), in words

    title = "Activation patching"

    @property
    def baseline(self) -> float:
        """The normalised value of an ineffective patch: 0 for denoising, 1 for noising."""
        return 0.0 if self.direction == "denoising" else 1.0

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return tuple(self.patched_logit_diff.shape[:-1])

    def per_example(self) -> torch.Tensor:
        """``[*grid, batch]``: ``(LD_patched - LD_corrupted) / (LD_clean - LD_corrupted)`` per example."""
        gap = self.clean_logit_diff - self.corrupted_logit_diff
        return (self.patched_logit_diff - self.corrupted_logit_diff) / gap

    def _ratio_of_means(self, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Batch-normalised value; ``weights [R, batch]`` (resample counts) gives ``[*grid, R]``."""
        gap = self.clean_logit_diff - self.corrupted_logit_diff
        moved = self.patched_logit_diff - self.corrupted_logit_diff
        if weights is None:
            return moved.mean(-1) / gap.mean()
        return (moved @ weights.T) / (weights @ gap)

    def mean(self) -> torch.Tensor:
        """``[*grid]``: ``(mean LD_patched - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted)``."""
        return self._ratio_of_means()

    def effect(self) -> torch.Tensor:
        """``[*grid]``: ``mean() - baseline`` -- 0 for no effect, in both directions."""
        return self.mean() - self.baseline

    def bootstrap_ci(
        self, confidence: float = 0.95, n_resamples: int = 1000, seed: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Percentile bootstrap interval of :meth:`mean` over examples: ``(low [*grid], high [*grid])``."""
        if not 0.0 < confidence < 1.0 or n_resamples < 1:
            raise InputError(f"need 0 < confidence < 1 and n_resamples >= 1, got {confidence}, {n_resamples}")
        batch = int(self.patched_logit_diff.shape[-1])
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randint(batch, (n_resamples, batch), generator=gen)
        counts = torch.zeros(n_resamples, batch).scatter_add_(1, idx, torch.ones(n_resamples, batch))  # cpu: seeded
        stats = self._ratio_of_means(counts.to(self.patched_logit_diff))  # on the results' device and dtype
        alpha = (1.0 - confidence) / 2
        q = torch.tensor([alpha, 1.0 - alpha], dtype=stats.dtype, device=stats.device)
        low, high = torch.quantile(stats, q, dim=-1)
        return low, high

    def cell_name(self, cell: tuple[int, ...]) -> str:
        """``L2H0`` for a head, ``L2 pos 5`` for a layer and position, ``L2H0 pos 5`` for both."""
        names = dict(zip(self.axis_names, cell))
        out = f"L{names['layer']}" if "layer" in names else ""
        out += f"H{names['head']}" if "head" in names else ""
        out += f" {self.labels[names['role']]}" if "role" in names else ""
        return out + (f" pos {names['pos']}" if "pos" in names else "")

    def cells(self) -> list[tuple[int, ...]]:
        """Every grid index, in row-major order."""
        return list(itertools.product(*(range(s) for s in self.grid_shape)))

    def cell_columns(self, cell: tuple[int, ...]) -> dict[str, Any]:
        """A cell's axis indices, plus the slot's name (``slot``) on a ``role`` axis."""
        cols: dict[str, Any] = dict(zip(self.axis_names, cell))
        if "role" in cols:
            cols["slot"] = self.labels[cols["role"]]
        return cols

    def to_dataframe(self, per_example: bool = False, seed: int = 0) -> Any:
        """One row per grid cell (``mean``, ``effect``, 95% bootstrap ``ci_low``/``ci_high``), or with
        ``per_example=True`` one row per (cell, example) with ``logit_diff`` and ``normalised``."""
        import pandas as pd

        cells = self.cells()
        if per_example:
            ld = self.patched_logit_diff.reshape(len(cells), -1)
            norm = self.per_example().reshape(len(cells), -1)
            rows = [
                {**self.cell_columns(c), "example": b, "logit_diff": float(ld[i, b]),
                 "normalised": float(norm[i, b])}
                for i, c in enumerate(cells) for b in range(ld.shape[1])
            ]  # fmt: skip
            return pd.DataFrame(rows)
        mean, effect = self.mean().reshape(-1), self.effect().reshape(-1)
        low, high = (t.reshape(-1) for t in self.bootstrap_ci(seed=seed))
        rows = [
            {**self.cell_columns(c), "mean": float(mean[i]), "effect": float(effect[i]),
             "ci_low": float(low[i]), "ci_high": float(high[i])}
            for i, c in enumerate(cells)
        ]  # fmt: skip
        return pd.DataFrame(rows)

    def plot(self) -> Any:
        """A plotly heatmap of :meth:`effect`: layer x head, layer x position, or (layer, head) x position."""
        import plotly.graph_objects as go

        eff = self.effect().detach().float()
        if len(self.axis_names) == 3:  # (layer, pos or role, head)
            n_l, n_p, n_h = eff.shape
            z = eff.permute(0, 2, 1).reshape(n_l * n_h, n_p)
            y = [f"L{l}H{h}" for l in range(n_l) for h in range(n_h)]
            x = list(self.labels) if self.labels else [str(p) for p in range(n_p)]
            x_title, y_title = "role" if self.labels else "position", "head"
        else:
            z = eff
            y = [f"L{l}" for l in range(eff.shape[0])]
            x = (list(self.labels) if self.axis_names[1] == "role"
                 else [f"H{i}" if self.axis_names[1] == "head" else str(i) for i in range(eff.shape[1])])  # fmt: skip
            x_title, y_title = self.axis_names[1], "layer"
        bound = float(z.abs().max()) or 1.0
        fig = go.Figure(go.Heatmap(z=z.numpy(), x=x, y=y, colorscale="RdBu", zmid=0.0, zmin=-bound, zmax=bound,
                                   colorbar={"title": "effect"}))  # fmt: skip
        what = "restored by" if self.direction == "denoising" else "lost by"
        fig.update_layout(
            title=f"{self.method} patching of {self.activation} ({self.direction}): share of clean logit "
            f"difference {what} the patch, batch-normalised",
            xaxis_title=x_title, yaxis_title=y_title, yaxis_autorange="reversed", xaxis_type="category",
            yaxis_type="category",
        )  # fmt: skip
        return fig

    def summary(self) -> str:
        eff = self.effect()
        top = torch.topk(eff.abs().reshape(-1), k=min(5, eff.numel())).indices
        cells = self.cells()
        best = ", ".join(f"{self.cell_name(cells[int(i)])}: {float(eff.reshape(-1)[int(i)]):+.3f}" for i in top)
        return (
            f"{self.method} patching of {self.activation}, {self.direction}, grid {self.axis_names} "
            f"{list(self.grid_shape)}, batch {self.patched_logit_diff.shape[-1]}; clean LD "
            f"{float(self.clean_logit_diff.mean()):.3f}, corrupted LD {float(self.corrupted_logit_diff.mean()):.3f}; "
            f"largest effects {best}"
        )

    def _repr_html_(self) -> str:
        import html

        from icl_circuits.report import table_html

        df = self.to_dataframe()
        df = df.reindex(df["effect"].abs().sort_values(ascending=False).index)
        return f"<div><pre>{html.escape(self.summary())}</pre>{table_html(df, max_rows=12)}</div>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "activation": self.activation, "direction": self.direction, "method": self.method,
            "axis_names": list(self.axis_names), "patched_logit_diff": self.patched_logit_diff.tolist(),
            "clean_logit_diff": self.clean_logit_diff.tolist(),
            "corrupted_logit_diff": self.corrupted_logit_diff.tolist(), "mean": self.mean().tolist(),
            **({"labels": list(self.labels)} if self.labels else {}), "notes": list(self.notes),
        }  # fmt: skip


def check_inputs(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    answer_tokens: torch.Tensor,
    contrast_tokens: torch.Tensor,
    answer_positions: torch.Tensor | None,
    direction: str,
) -> torch.Tensor:
    """Validate a clean/corrupted batch; return ``answer_positions [batch]`` (default: the last position)."""
    if direction not in DIRECTIONS:
        raise InputError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if getattr(model, "training", False):
        raise InputError("the model is in training mode (dropout would differ between runs); call model.eval()")
    for name, t in (("clean_tokens", clean_tokens), ("corrupted_tokens", corrupted_tokens)):
        if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.is_floating_point():
            raise InputError(f"{name} must be an integer tensor [batch, pos], got {getattr(t, 'shape', type(t))}")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise InputError(
            f"clean and corrupted tokens must have the same shape (positions must align), got "
            f"{list(clean_tokens.shape)} and {list(corrupted_tokens.shape)}"
        )
    batch, n_pos = clean_tokens.shape
    vocab = int(model.cfg.d_vocab)
    for name, t in (("answer_tokens", answer_tokens), ("contrast_tokens", contrast_tokens)):
        if not isinstance(t, torch.Tensor) or t.shape != (batch,) or t.is_floating_point():
            raise InputError(f"{name} must be an integer tensor [batch={batch}], got {getattr(t, 'shape', type(t))}")
        if int(t.min()) < 0 or int(t.max()) >= vocab:
            raise InputError(f"{name} holds ids outside the vocabulary 0..{vocab - 1}")
    if bool((answer_tokens == contrast_tokens).any()):
        raise InputError("an answer token equals its contrast token: the logit difference would be 0")
    if answer_positions is None:
        return torch.full((batch,), n_pos - 1, dtype=torch.long)  # cpu: positions index, like the tokens
    if answer_positions.shape != (batch,) or int(answer_positions.min()) < 0 or int(answer_positions.max()) >= n_pos:
        raise InputError(f"answer_positions must be [batch={batch}] with values in 0..{n_pos - 1}")
    return answer_positions.long()


def _hook_name(activation: str, layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre" if activation == "resid_pre" else f"blocks.{layer}.attn.hook_{activation}"


def _cells(
    activation: str, per_position: bool, act: torch.Tensor, slots: RoleSlots | None = None
) -> tuple[tuple[str, ...], list[tuple[int, ...]]]:
    """Axis names (after ``layer``) and the cells of one layer for ``act [batch, ...]``; with ``slots`` the
    position axis is ``role`` (one cell per slot, covering that slot's positions in every prompt)."""
    pos_axis = "pos" if slots is None else "role"
    if activation == "resid_pre":
        return (pos_axis,), [(p,) for p in range(act.shape[1] if slots is None else len(slots))]
    n_heads = act.shape[1] if activation == "pattern" else act.shape[2]
    n_pos = act.shape[2] if activation == "pattern" else act.shape[1]
    if slots is not None:
        n_pos = len(slots)
    if per_position:
        return (pos_axis, "head"), [(p, h) for p in range(n_pos) for h in range(n_heads)]
    return ("head",), [(h,) for h in range(n_heads)]


def _index(activation: str, cell: tuple[int, ...]) -> tuple[Any, ...]:
    """Index into ``act [batch, ...]`` that a patch of ``cell`` overwrites."""
    if activation == "resid_pre":
        return (slice(None), cell[0])
    if activation == "pattern":
        return (slice(None), cell[-1]) if len(cell) == 1 else (slice(None), cell[1], cell[0])
    return (slice(None), slice(None), cell[0]) if len(cell) == 1 else (slice(None), cell[0], cell[1])


def _region(activation: str, cell: tuple[int, ...], slots: RoleSlots, act: torch.Tensor) -> torch.Tensor:
    """Bool mask broadcastable to ``act [batch, ...]``: what a patch of the role cell ``cell`` overwrites --
    the slot's positions in each prompt (``[batch, pos]``, rows of their own length), at one head."""
    at = slots.mask(cell[0]).to(act.device)  # [batch, pos]
    if activation == "resid_pre":
        return at[:, :, None]
    heads = torch.arange(act.shape[1] if activation == "pattern" else act.shape[2], device=act.device) == cell[1]
    if activation == "pattern":  # [batch, head, dest, src]: the slot's destination rows
        return heads[None, :, None, None] & at[:, None, :, None]
    return at[:, :, None, None] & heads[None, None, :, None]  # [batch, pos, head, d]


def _patch_hook(
    activation: str, cells: list[tuple[int, ...]], src: torch.Tensor, batch: int, slots: RoleSlots | None = None
) -> Any:
    def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
        act = act.clone()
        for i, cell in enumerate(cells):
            rows = slice(i * batch, (i + 1) * batch)
            if slots is not None:
                act[rows] = torch.where(_region(activation, cell, slots, src), src, act[rows])
                continue
            ix = _index(activation, cell)
            act[(rows, *ix[1:])] = src[ix]
        return act

    return hook


def _run_patched(
    base: BaseRun,
    source: BaseRun,
    activation: str,
    name: str,
    layer: int,
    cells: list[tuple[int, ...]],
    slots: RoleSlots | None = None,
) -> torch.Tensor:
    """``[len(cells) * batch]``: one copy of the base batch per cell, each with that cell patched."""
    batch = base.batch
    x = base.resid(layer).repeat(len(cells), 1, 1)
    hooks: list[tuple[str, Any]] = []
    if activation == "resid_pre":
        src = source.resid(layer)
        for k, cell in enumerate(cells):
            rows = slice(k * batch, (k + 1) * batch)
            if slots is not None:
                x[rows] = torch.where(_region(activation, cell, slots, src), src, x[rows])
            else:
                x[rows, cell[0]] = src[:, cell[0]]
    else:
        hooks = [(name, _patch_hook(activation, cells, source.acts[name], batch, slots))]
    return base.logit_diff_from(layer, x, hooks)


def _mid_with_heads(
    model: Any, base: BaseRun, source: BaseRun, layer: int, cells: list[tuple[int, ...]], slots: RoleSlots | None = None
) -> torch.Tensor:
    """Base mid-residuals of ``layer``, one copy per cell, plus ``(z_source - z_base)[cell] @ W_O[head]``."""
    batch, name = base.batch, f"blocks.{layer}.attn.hook_z"
    w_o = model.W_O[layer].detach()  # [head, d_head, d_model]
    x = base.mid_resid(layer).repeat(len(cells), 1, 1)
    delta = source.acts[name] - base.acts[name]  # [batch, pos, head, d_head]
    for k, cell in enumerate(cells):
        rows = slice(k * batch, (k + 1) * batch)
        if len(cell) == 1:
            x[rows] += delta[:, :, cell[0]] @ w_o[cell[0]]
        elif slots is not None:
            at = slots.mask(cell[0]).to(delta.device)[:, :, None]
            x[rows] += (delta[:, :, cell[1]] * at) @ w_o[cell[1]]
        else:
            x[rows, cell[0]] += delta[:, cell[0], cell[1]] @ w_o[cell[1]]
    return x


def _unchanged(activation: str, cell: tuple[int, ...], src: torch.Tensor, own: torch.Tensor,
               slots: RoleSlots | None) -> bool:
    """Whether patching ``cell`` copies a value equal to the base run's (the identity)."""
    if slots is None:
        ix = _index(activation, cell)
        return torch.equal(src[ix], own[ix])
    if len(cell) == 1 and activation != "resid_pre":  # a whole head: not a role cell
        ix = _index(activation, cell)
        return torch.equal(src[ix], own[ix])
    return not bool(((src != own) & _region(activation, cell, slots, src)).any())


def aligned_slots(
    roles: PromptRoles | RoleSlots | None,
    positions: torch.Tensor,
    shape: tuple[int, ...],
    what: str,
    same_layout: bool = False,
) -> RoleSlots | None:
    """The role slots of a per-position result over ``[batch, pos]`` prompts, or ``None`` (plain positions).

    Without ``roles`` prompts must all end at the same position (so the one layout TransformerLens
    assumes is at least plausible) unless the caller declares ``same_layout`` (index ``p`` is the same
    thing in every prompt, e.g. random tokens); prompts of different lengths are refused otherwise: index
    ``p`` would mean different pieces of different prompts.

    Raises:
        InputError: no ``roles`` for prompts of different lengths; roles of another shape; roles whose
            prompts have different pieces (:func:`~icl_circuits.tasks.roles.role_slots`).
    """
    if roles is not None and same_layout:
        raise InputError("pass roles= (align by role) or same_layout=True (align by position index), not both")
    if roles is None:
        if not same_layout and bool((positions != positions[0]).any()):
            raise InputError(
                f"{what} per position: the prompts differ in token length (answer positions "
                f"{int(positions.min())}..{int(positions.max())}), so position index p means different roles in "
                "different prompts; pass roles= (tasks.roles) to align positions by role, or same_layout=True if "
                "index p is the same piece of every prompt"
            )
        return None
    slots = roles if isinstance(roles, RoleSlots) else role_slots(roles)
    if tuple(slots.index.shape) != tuple(shape):
        raise InputError(f"roles cover {list(slots.index.shape)} positions, the tokens are {list(shape)}")
    return slots


def activation_patch(
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
    max_rows: int = 256,
    fast_activations: bool = True,
    progress: bool = True,
    roles: PromptRoles | RoleSlots | None = None,
    same_layout: bool = False,
) -> PatchEffects:
    """Patch every cell of ``activation`` exactly; the logit difference of each patched run, per example.

    Args:
        clean_tokens, corrupted_tokens: ``[batch, pos]``, aligned position by position.
        answer_tokens, contrast_tokens: ``[batch]``; ``LD = logit[answer] - logit[contrast]``.
        activation: ``"z"`` (head output, as TransformerLens's ``*_attn_head_out_*``), ``"q"``, ``"k"``,
            ``"v"``, ``"pattern"``, or ``"resid_pre"`` (the residual entering each block; per position).
        per_position: patch one position at a time: grid ``(layer, pos, head)`` (for ``pattern`` the
            destination position) instead of ``(layer, head)``.
        direction: ``"denoising"`` (clean into corrupted) or ``"noising"`` (corrupted into clean).
        answer_positions: ``[batch]`` where the answer is read (right-padded batches); default last.
        max_rows: most sequences in one resumed forward (patches x batch), bounding memory.
        fast_activations: run GPT-2's tanh-GELU as one fused kernel (the same function; see
            :func:`icl_circuits.patching.resume.fused_activations`); ``False`` keeps the model's own modules.
        roles: with ``per_position``, align positions by role (:class:`~icl_circuits.tasks.roles.PromptRoles`
            of the prompts, or their :class:`~icl_circuits.tasks.roles.RoleSlots`): the grid's position axis
            becomes ``role``, one cell per slot (``d2 demo_label``, ``query_key``...), and a patch covers that
            slot's positions in every prompt, whatever their token length there. Needed for prompts of
            different lengths (refused otherwise, see :func:`aligned_slots`).
        same_layout: with ``per_position`` and no ``roles``, declare that index ``p`` is the same piece of
            every prompt (random tokens, hand-aligned batches), so prompts of different lengths are accepted.

    Raises:
        InputError: malformed tokens/answers, unknown activation or direction, a model in training
            mode, an architecture whose blocks cannot be resumed from cached inputs, or per-position
            patching of prompts whose positions do not align (different lengths, no ``roles``).
    """
    if activation not in ACTIVATIONS:
        raise InputError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "resid_pre" and not per_position:
        raise InputError("patching the whole residual stream of a layer restores everything; use per_position=True")
    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    positions = check_inputs(model, clean_tokens, corrupted_tokens, answer_tokens, contrast_tokens,
                             answer_positions, direction)  # fmt: skip
    slots = None
    if per_position:
        slots = aligned_slots(roles, positions, tuple(clean_tokens.shape), f"patching {activation}", same_layout)
    with fused_activations(model, fast_activations):
        return _sweep(model, clean_tokens, corrupted_tokens, answer_tokens, contrast_tokens, activation,
                      per_position, direction, positions, max_rows, progress, slots)  # fmt: skip


def _sweep(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    answer_tokens: torch.Tensor,
    contrast_tokens: torch.Tensor,
    activation: str,
    per_position: bool,
    direction: str,
    positions: torch.Tensor,
    max_rows: int,
    progress: bool,
    slots: RoleSlots | None = None,
) -> PatchEffects:
    n_layers = int(model.cfg.n_layers)
    names = [_hook_name(activation, l) for l in range(n_layers)]
    clean = capture_run(model, clean_tokens, names, answer_tokens, contrast_tokens, positions)
    corrupted = capture_run(model, corrupted_tokens, names, answer_tokens, contrast_tokens, positions)
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    base.check()
    batch = base.batch
    sub_axes, layer_cells = _cells(activation, per_position, base.acts[names[0]], slots)
    out = torch.empty(n_layers, len(layer_cells), batch, device=base.logit_diff.device)  # the model's device
    jobs: list[tuple[int, list[int]]] = []
    for l in range(n_layers):
        src, own = source.acts[names[l]], base.acts[names[l]]
        todo = []
        for i, cell in enumerate(layer_cells):
            if _unchanged(activation, cell, src, own, slots):
                out[l, i] = base.logit_diff  # copying an equal value is the identity
            else:
                todo.append(i)
        per_chunk = max(1, max_rows // batch)
        jobs += [(l, todo[j : j + per_chunk]) for j in range(0, len(todo), per_chunk)]
    use_mid = activation == "z" and base.sequential
    jobs.sort(key=lambda job: -job[0])  # deepest layer first: the cheapest job verifies the shortcut
    for j, (l, chunk) in enumerate(tqdm(jobs, desc=f"patching {activation}", unit="fwd", disable=not progress)):
        cells = [layer_cells[i] for i in chunk]
        if use_mid:  # a head's output enters the residual as z @ W_O: start after the layer's attention
            ld = base.logit_diff_from(l, _mid_with_heads(model, base, source, l, cells, slots), mid=True)
            if j == 0:  # verify the shortcut on this model against patching hook_z, once
                exact = _run_patched(base, source, activation, names[l], l, cells, slots)
                if float((ld - exact).abs().max()) > 1e-4 * (1.0 + float(exact.abs().max())):
                    use_mid, ld = False, exact
        else:
            ld = _run_patched(base, source, activation, names[l], l, cells, slots)
        out[l, chunk] = ld.reshape(len(cells), batch).float()
    grid = (n_layers, *(len({c[k] for c in layer_cells}) for k in range(len(sub_axes))))
    return PatchEffects(
        activation=activation,
        direction=direction,
        axis_names=("layer", *sub_axes),
        patched_logit_diff=out.reshape(*grid, batch),
        clean_logit_diff=clean.logit_diff,
        corrupted_logit_diff=corrupted.logit_diff,
        labels=slots.names if slots is not None else (),
        notes=(base.shortcut_note,) if base.shortcut_note else (),
    )
