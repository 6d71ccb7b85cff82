"""``information-flow``: label words as anchors, by layer (Wang et al. 2023, "Label Words are Anchors").

**Saliency.** For a prompt with answer position ``q`` and loss ``L = -log softmax(logits[q])[answer]``
(cross-entropy of the answer's first token), layer ``l``'s saliency matrix is::

    I_l = | sum_h A_{l,h} (.) dL/dA_{l,h} |          # [pos, pos], (.) elementwise, |.| after the head sum

with ``A_{l,h} = blocks.{l}.attn.hook_pattern[b, h]`` (query ``i`` x key ``j``). The gradient is taken
with ``torch.autograd.grad`` of the batch's summed loss (each prompt's loss depends only on its own
row) with respect to the pattern tensors captured by forward hooks inside ``model.hooks(...)``; the
graph starts at a detached copy of ``blocks.0.hook_resid_pre`` with ``requires_grad``, so it exists
even when parameters are frozen and no parameter's ``.grad`` is touched.

**Flows** (their eq. 2-4), with ``P`` the positions of the demo labels' tokens ("label words")::

    S_wp = mean over C_wp = {(p, j): p in P, j < p}        demo text -> label words
    S_pq = mean over C_pq = {(q, p): p in P}                label words -> answer position
    S_ww = mean over {(i, j): j < i <= q} - C_wp - C_pq     everything else

per prompt, then averaged over prompts. ``share_*`` are each flow over ``S_wp + S_pq + S_ww`` (their
Figure 3's relative sizes). Wang et al. find ``S_wp`` high in shallow layers and ``S_pq`` dominant in
deep ones; the reading reports, from the numbers, which flow is largest at each layer.

Cost: one forward and one backward per ``batch_size`` prompts, holding every layer's pattern and its
gradient (``2 L H pos^2`` floats per prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from icl_circuits.analyze.base import AnalysisMixin, TaskArg, check_positive, fmt, pick_tasks, task_label
from icl_circuits.errors import InputError
from icl_circuits.heads.scan import token_labels
from icl_circuits.models import model_info
from icl_circuits.report import Section, attention_html, figure_html, table_html
from icl_circuits.tasks.defaults import run_default
from icl_circuits.tasks.prompts import build_prompts, check_task
from icl_circuits.tasks.registry import get_task
from icl_circuits.tasks.roles import roles_from_prompts
from icl_circuits.tasks.scoring import batch_chunks, padded_batch

FIXTURE_TASKS = ("fixture-bound", "fixture-rule")
FLOWS = ("S_wp", "S_pq", "S_ww")
COLORS = {"S_wp": "#4c78a8", "S_pq": "#e45756", "S_ww": "#54a24b"}
LABEL_ROLE = 3  # prompt_roles.ROLE_NAMES.index("demo_label")


def saliency(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    answer_ids: torch.Tensor,
    last_positions: torch.Tensor | None = None,
    *,
    batch_size: int = 16,
) -> torch.Tensor:
    """``I [batch, layer, pos, pos]``: ``|sum_h A (.) dL/dA|`` per prompt and layer (module doc)."""
    padded, last = padded_batch(model, tokens, last_positions)
    if answer_ids.shape != (padded.shape[0],):
        raise InputError(f"answer_ids must be [{padded.shape[0]}], got {tuple(answer_ids.shape)}")
    L = int(model.cfg.n_layers)
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(L)]
    device = getattr(model.cfg, "device", None) or "cpu"
    out = torch.zeros(padded.shape[0], L, padded.shape[1], padded.shape[1])  # cpu: saliency gathered there
    captured: dict[str, torch.Tensor] = {}

    def leaf(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x.detach().requires_grad_(True)

    def keep(x: torch.Tensor, hook: Any) -> None:
        captured[hook.name] = x  # the tensor the rest of the forward uses: its gradient is dL/dA

    for rows, chunk, pos in batch_chunks(padded, last, batch_size):
        captured.clear()
        hooks = [("blocks.0.hook_resid_pre", leaf), *((n, keep) for n in names)]
        with torch.enable_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(chunk.to(device))
            b = torch.arange(len(chunk))
            loss = -logits[b, pos.to(logits.device)].float().log_softmax(-1)[b, answer_ids[rows].to(logits.device)]
            grads = torch.autograd.grad(loss.sum(), [captured[n] for n in names])
        width = chunk.shape[1]
        for l, (n, g) in enumerate(zip(names, grads)):
            out[rows, l, :width, :width] = (captured[n].detach() * g).sum(1).abs().float().cpu()
    return out


def flow_masks(roles: torch.Tensor, last_positions: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{S_wp, S_pq, S_ww: [batch, pos, pos] bool}`` (query x key) from ``roles [batch, pos]`` (module doc)."""
    batch, width = roles.shape
    i = torch.arange(width)[None, :, None]
    j = torch.arange(width)[None, None, :]
    label = roles == LABEL_ROLE  # [batch, pos]
    q = last_positions[:, None, None]
    causal = (j < i) & (i <= q)
    wp = label[:, :, None] & (j < i) & (i <= q)
    pq = (i == q) & label[:, None, :]
    return {"S_wp": wp, "S_pq": pq, "S_ww": causal & ~wp & ~pq}


def flows(sal: torch.Tensor, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{flow: [batch, layer]}``: the mean of ``sal [batch, layer, pos, pos]`` over each mask, per prompt."""
    out = {}
    for name, m in masks.items():
        w = m[:, None].float()
        out[name] = (sal * w).sum((-1, -2)) / w.sum((-1, -2)).clamp_min(1.0)
    return out


@dataclass(frozen=True)
class InformationFlow(AnalysisMixin):
    """``rows``: one per (task, layer) with ``S_wp``, ``S_pq``, ``S_ww`` (means over prompts) and their shares."""

    name: ClassVar[str] = "information-flow"
    title: ClassVar[str] = "Information flow through label words (Wang et al. 2023)"
    model: str
    seed: int
    n: int
    shots: int
    rows: tuple[dict[str, Any], ...]
    example_tokens: tuple[str, ...] = ()  # the first prompt of the first task, as token strings
    example_saliency: torch.Tensor | None = field(default=None, repr=False)  # [layer, pos, pos] for that prompt

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        example = None if self.example_saliency is None else {
            "tokens": list(self.example_tokens),
            "saliency": [[[round(float(x), 8) for x in row] for row in layer] for layer in self.example_saliency]}
        return {"analysis": self.name, "model": self.model, "seed": self.seed, "n": self.n, "shots": self.shots,
                "rows": [dict(r) for r in self.rows], "example": example, "findings": self.findings()}  # fmt: skip

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self.rows))

    def figures(self) -> list[Any]:
        """[relative sizes of the three flows by layer, one panel per task; absolute sizes]. Pure."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        figs = []
        for prefix, title in (("share_", "relative size (sums to 1 per layer)"), ("", "mean saliency")):
            fig = make_subplots(rows=1, cols=len(self.tasks), subplot_titles=self.tasks, shared_yaxes=True)
            for j, task in enumerate(self.tasks, start=1):
                rows = [r for r in self.rows if r["task"] == task]
                for f in FLOWS:
                    trace = go.Scatter(x=[r["layer"] for r in rows], y=[r[prefix + f] for r in rows],
                                       mode="lines+markers", name=f, legendgroup=f, showlegend=j == 1,
                                       line={"color": COLORS[f]})  # fmt: skip
                    fig.add_trace(trace, 1, j)
                fig.update_xaxes(title_text="layer", dtick=1, row=1, col=j)
            fig.update_yaxes(title_text=title, row=1, col=1)
            fig.update_layout(title=f"S_wp (text -> label words), S_pq (label words -> answer), S_ww (rest): {title}")
            figs.append(fig)
        return figs

    def _reading(self, task: str) -> str:
        rows = [r for r in self.rows if r["task"] == task]
        top = [max(FLOWS, key=lambda f: r["share_" + f]) for r in rows]
        by_layer = ", ".join(f"L{r['layer']}: {t} ({fmt(r['share_' + t])})" for r, t in zip(rows, top))
        cross = next((r["layer"] for r in rows if r["share_S_pq"] > r["share_S_wp"]), None)
        wp_peak = max(rows, key=lambda r: r["share_S_wp"])
        pq_peak = max(rows, key=lambda r: r["share_S_pq"])
        text = (f"{task} ({self.shots} demos, {self.n} prompts): the largest flow per layer (share) is {by_layer}. "
                f"S_wp's share peaks at layer {wp_peak['layer']} ({fmt(wp_peak['share_S_wp'])}), S_pq's at layer "
                f"{pq_peak['layer']} ({fmt(pq_peak['share_S_pq'])}).")  # fmt: skip
        if cross is None:
            return text + " S_pq never exceeds S_wp."
        return text + f" S_pq first exceeds S_wp at layer {cross}."

    def example_html(self) -> str:
        """circuitsvis view of one prompt's saliency matrices (one "head" per layer, each scaled to max 1)."""
        if self.example_saliency is None or not self.example_tokens:
            return ""
        sal = self.example_saliency
        scaled = sal / sal.flatten(1).amax(-1).clamp_min(1e-30)[:, None, None]
        names = [f"layer {l}" for l in range(sal.shape[0])]
        return attention_html(list(self.example_tokens), scaled, names)

    def sections(self) -> list[Section]:
        share, absolute = self.figures()
        out = [
            Section("Relative size of the flows by layer", figure_html(share),
                    [self._reading(t) for t in self.tasks]),
            Section("Mean saliency of each flow", figure_html(absolute),
                    "I_l = |sum_h A (.) dL/dA|, L the cross-entropy of the answer at the answer position; label words "
                    "are the demo labels' tokens."),
        ]  # fmt: skip
        if self.example_saliency is not None:
            out.append(Section(f"Saliency of one {self.tasks[0]} prompt, by layer", self.example_html(),
                               "Each layer's I_l scaled to its largest entry; rows are queries (destination), columns "
                               "keys (source)."))  # fmt: skip
        out.append(Section("Numbers", table_html(self.to_dataframe(), max_rows=200, float_format="{:.4g}")))
        return out

    def findings(self) -> dict[str, Any]:
        task = self.tasks[0]
        rows = [r for r in self.rows if r["task"] == task]
        cross = next((r["layer"] for r in rows if r["share_S_pq"] > r["share_S_wp"]), None)
        return {"task": task, "share_S_wp_first_layer": rows[0]["share_S_wp"],
                "share_S_pq_last_layer": rows[-1]["share_S_pq"], "S_pq_exceeds_S_wp_from_layer": cross,
                "reading": self._reading(task)}  # fmt: skip


def run_information_flow(
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    shots: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> InformationFlow:
    """Wang et al.'s flows ``S_wp``, ``S_pq``, ``S_ww`` by layer for each task (module doc).

    Defaults: ``n = 32`` prompts, ``shots = 6`` (fixture vocabulary) or 4.

    Raises:
        InputError: bad sizes; TaskError: unknown task; TokenizationError: a template whose pieces merge.
    """
    n = run_default(model, "information-flow", "n", n)
    k = run_default(model, "information-flow", "shots", shots)
    check_positive(n=n, shots=k)
    rows = []
    example: tuple[tuple[str, ...], torch.Tensor | None] = ((), None)
    names = pick_tasks(model, tasks, FIXTURE_TASKS, min_shots=k)
    for given in tqdm(names, desc="information-flow", disable=not progress):
        name = task_label(given)
        checked = check_task(model, get_task(given, model))
        ps = build_prompts(model, checked, k, n, seed)
        roles = roles_from_prompts(model, ps, checked.template)
        sal = saliency(model, ps.tokens, ps.answer_ids, batch_size=batch_size)
        per = flows(sal, flow_masks(roles.roles, roles.last_positions))
        if example[1] is None:
            width = len(ps.tokens[0])
            example = (tuple(token_labels(model, torch.tensor(ps.tokens[0]))), sal[0, :, :width, :width].clone())
        mean = {f: per[f].mean(0) for f in FLOWS}  # [layer]
        total = mean["S_wp"] + mean["S_pq"] + mean["S_ww"]
        for l in range(int(model.cfg.n_layers)):
            denom = float(total[l]) or 1.0
            rows.append({"task": name, "layer": l, **{f: float(mean[f][l]) for f in FLOWS},
                         **{"share_" + f: float(mean[f][l]) / denom for f in FLOWS}})  # fmt: skip
    return InformationFlow(model_info(model).spec, seed, n, k, tuple(rows), *example)
