"""The fast-weight account's predictions, measured: repeating demos, noisy demos, demo order.

If the demos act as a temporary weight ``dW = sum_s u_s k~_s^T / sqrt(d_head)`` (see
:mod:`icl_circuits.fast_weights.decompose`), then

1. **repetition** (the demo block written ``r`` times): the linear dual form grows like ``r``
   (``|dW_lin|_F`` is a sum over demo tokens); softmax normalises, so the demo part ``c_D`` of a
   head's output need not grow. Measured per ``r``: ``|dW_lin|_F``, ``|c_D|``, the demo share of the
   head output, the demo part's answer logit (logit lens), and the model's accuracy;
2. **label noise** (a fraction ``p`` of demo labels replaced by other labels): the in-context update
   should shrink toward the zero-shot ("mean") prediction. With ``u_p = log_softmax(logits of the
   p-noisy prompt) - log_softmax(logits of the zero-shot prompt with the same query)`` at the answer
   position, the **shrinkage coefficient** is ``beta_p = sum_b <u_p,b, u_0,b> / sum_b |u_0,b|^2``
   (:func:`icl_circuits.tasks.scoring.shrink_coefficient` over the full vocabulary; 1 at ``p = 0``;
   0 when the update has no component along the clean one). Also ``|u_p|``, the
   demo part's answer logit and the accuracy;
3. **demo order** (the same pairs in a random order): a linear fast weight is order-free; any change
   comes from positions and earlier layers. Measured: the relative change ``|dW(perm) - dW|_F / |dW|_F``
   against the same quantity between two prompts with different demos (the scale of "a different
   dW"), the cosine between the demo parts, and how often the model's prediction is unchanged.

All quantities are summed (``c_D``) or averaged (norms, shares) over the chosen heads, and averaged
over prompts. The examples are drawn once from ``default_rng(seed)``; manipulations from
``default_rng([seed, 1])``, so every setting sees the same queries and demo pairs.

Cost: one decomposition forward and one plain forward per setting (``len(repeats) + len(noise) +
n_orders + 2`` settings), plus one zero-shot forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl_circuits.errors import PromptTooLongError, TaskError
from icl_circuits.fast_weights import decompose as fw
from icl_circuits.fast_weights.transplant import logits_with_vector
from icl_circuits.results import Result, renamed_kwargs, series_colors
from icl_circuits.tasks.registry import Task
from icl_circuits.tasks.roles import render_examples
from icl_circuits.tasks.scoring import shrink_coefficient


@dataclass(frozen=True)
class Predictions(Result):
    """Rows of the three experiments (``repetition``, ``noise``, ``order``), means over prompts."""

    model: str
    task: str
    shots: int
    heads: tuple[tuple[int, int], ...]
    repetition: tuple[dict[str, Any], ...]
    noise: tuple[dict[str, Any], ...]
    order: tuple[dict[str, Any], ...]
    n_prompts: int
    seed: int
    skipped: tuple[str, ...] = ()

    title = "Fast-weight predictions"

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": [list(h) for h in self.heads], "n_prompts": self.n_prompts, "seed": self.seed,
            "repetition": [dict(r) for r in self.repetition], "noise": [dict(r) for r in self.noise],
            "order": [dict(r) for r in self.order], "skipped": list(self.skipped),
        }  # fmt: skip

    def to_dataframe(self) -> Any:  # pandas.DataFrame, long format
        import pandas as pd

        parts = [pd.DataFrame(list(rows)).assign(experiment=name)
                 for name, rows in (("repetition", self.repetition), ("noise", self.noise), ("order", self.order))
                 if rows]  # fmt: skip
        if not parts:
            return pd.DataFrame()
        df = pd.concat(parts, ignore_index=True)
        counts = [c for c in ("repeat", "order") if c in df]  # integers (NaN-padded by the long format)
        return df.astype({c: "Int64" for c in counts})

    def figures(self) -> list[Any]:  # list[plotly Figure]
        """[repetition, noise, order] figures. Pure: returns the figures."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        colour = series_colors(["accuracy", "fw_norm", "demo_norm", "demo_answer_logit", "beta",
                                "demo answer logit (rel.)"])
        rep = make_subplots(rows=1, cols=2, subplot_titles=("|dW_lin|_F and |c_D| (relative to r=1)", "accuracy"))
        if self.repetition:
            r = [row["repeat"] for row in self.repetition]
            for key in ("fw_norm", "demo_norm", "demo_answer_logit"):
                base = self.repetition[0][key] or 1.0
                rep.add_trace(go.Scatter(x=r, y=[row[key] / base for row in self.repetition], name=key,
                                         line={"color": colour[key]}), 1, 1)  # fmt: skip
            rep.add_trace(go.Scatter(x=r, y=[row["accuracy"] for row in self.repetition], name="accuracy",
                                     line={"color": colour["accuracy"]}), 1, 2)  # fmt: skip
        rep.update_xaxes(dtick=1, title_text="r")
        skipped = [s for s in self.skipped if s.startswith("repeating")]
        if skipped:  # said on the figure too: a lone point at r = 1 is what was measured, not a flat line
            rep.add_annotation(text="not measured: " + "; ".join(s.split(":")[0] for s in skipped) + " (longer "
                               "than the context)", xref="paper", yref="paper", x=0.5, y=-0.28, showarrow=False)
        rep.update_layout(title="Repeating the demo block r times", margin={"b": 90})
        noi = make_subplots(rows=1, cols=2, subplot_titles=("update along the clean update (beta)", "accuracy"))
        if self.noise:
            p = [row["noise"] for row in self.noise]
            noi.add_trace(go.Scatter(x=p, y=[row["shrinkage_beta"] for row in self.noise], name="beta",
                                     line={"color": colour["beta"]}), 1, 1)  # fmt: skip
            ref = self.noise[0]["demo_answer_logit"] or 1.0
            rel = [row["demo_answer_logit"] / ref for row in self.noise]
            noi.add_trace(go.Scatter(x=p, y=rel, name="demo answer logit (rel.)",
                                     line={"color": colour["demo answer logit (rel.)"]}), 1, 1)  # fmt: skip
            noi.add_trace(go.Scatter(x=p, y=[row["accuracy"] for row in self.noise], name="accuracy",
                                     line={"color": colour["accuracy"]}, showlegend=False), 1, 2)  # fmt: skip
        noi.update_layout(title="Label noise: does the update shrink toward the zero-shot prediction?",
                          xaxis_title="fraction of demo labels flipped")  # fmt: skip
        names = [f"order {row['order'] + 1}" for row in self.order]  # numbered 1..n, like the demos
        ordf = go.Figure()
        for key, label in (("fw_rel_change", "|dW(perm) - dW| / |dW|"), ("fw_rel_change_other_demos", "other demos")):
            ordf.add_trace(go.Bar(name=label, x=names, y=[row[key] for row in self.order]))
        ordf.update_layout(barmode="group", title="Demo order: relative change of dW_lin (summed over heads' norms)")
        return [rep, noi, ordf]

    def _repr_html_(self) -> str:
        return f"<b>Fast-weight predictions</b> on {self.task} ({self.shots} shots)" + self.to_dataframe().to_html(
            index=False, float_format="%.3f"
        )


def _measure(model: Any, checked: Any, examples: Sequence[Any], heads: Sequence[tuple[int, int]]) -> dict[str, Any]:
    tokens, roles, ans, _ = render_examples(model, checked, examples)
    dec = fw.decompose(model, tokens, roles, heads)
    logits = logits_with_vector(model, tokens, roles.last_positions, None, 0)
    W_U = model.W_U.detach().float().cpu()
    c_D = dec.demo_part.sum(1)  # [batch, d_model], summed over heads
    direction = W_U[:, ans].T / dec.final_scale[:, None]
    return {
        "dec": dec,
        "logp": logits.log_softmax(-1),
        "row": {
            "fw_norm": float(dec.fw_isometric().flatten(2).norm(dim=-1).mean()),
            "demo_norm": float(c_D.norm(dim=-1).mean()),
            "demo_share": float(dec.shares(dec.demo_part[:, :, None])[..., 0].mean()),
            "demo_answer_logit": float((c_D * direction).sum(-1).mean()),
            "accuracy": float((logits.argmax(-1) == ans).float().mean()),
        },
    }


@renamed_kwargs(n_prompts="n")
def measure_predictions(
    model: Any,
    task: str | Task,
    shots: int,
    heads: Sequence[tuple[int, int]],
    *,
    n: int = 64,
    seed: int = 0,
    repeats: Sequence[int] = (1, 2, 3),
    noise: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n_orders: int = 3,
) -> Predictions:
    """Run the three experiments of the module doc on ``n`` prompts of ``task`` (a name or a Task) with
    ``shots`` demos and ``heads``.

    Repetitions whose prompts exceed the context are skipped (listed in ``skipped``).

    Raises:
        TaskError: ``shots < 2`` (order and noise need several demos), unknown task.
    """
    from icl_circuits.models import model_info
    from icl_circuits.tasks.prompts import check_task, flip_labels, permute_demos, repeat_demos
    from icl_circuits.tasks.registry import FewShot, get_task

    task = get_task(task, model)
    if shots < 2:
        raise TaskError(f"the predictions need shots >= 2, got {shots}")
    checked = check_task(model, task)
    rng, manip = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    examples = [checked.task.draw(rng, shots) for _ in range(n)]
    heads = fw.parse_heads(list(heads), model)
    skipped: list[str] = []
    rep_rows = []
    for r in repeats:
        try:
            m = _measure(model, checked, [repeat_demos(ex, int(r)) for ex in examples], heads)
        except PromptTooLongError as e:
            skipped.append(f"repeating the demos r = {r} times: the prompts exceed the model's context ({e})")
            continue
        rep_rows.append({"repeat": int(r), **m["row"]})
    zero = [FewShot((), ex.query) for ex in examples]
    zt, zr, _, _ = render_examples(model, checked, zero)
    logp0 = logits_with_vector(model, zt, zr.last_positions, None, 0).log_softmax(-1)
    noise_rows, logp_clean = [], None
    for p in sorted(set(float(x) for x in noise) | {0.0}):
        m = _measure(model, checked, [flip_labels(ex, p, checked.task.labels, manip) for ex in examples], heads)
        u = m["logp"] - logp0
        if logp_clean is None:
            logp_clean = m["logp"]
        beta = shrink_coefficient(m["logp"], logp_clean, logp0)  # normalised over the full vocabulary
        noise_rows.append({"noise": p, "shrinkage_beta": beta, "update_norm": float(u.norm(dim=-1).mean()), **m["row"]})
    base = _measure(model, checked, examples, heads)
    iso0 = base["dec"].fw_isometric()  # dW_lin up to an isometry: same norms and differences
    other = iso0.roll(1, dims=0)  # another prompt's dW: the scale of "different demos"
    order_rows = []
    for o in range(n_orders):
        m = _measure(model, checked, [permute_demos(ex, manip) for ex in examples], heads)
        d0, d1 = base["dec"], m["dec"]
        iso1 = d1.fw_isometric()
        ref = iso0.flatten(2).norm(dim=-1).clamp_min(1e-30)
        order_rows.append({
            "order": o,
            "fw_rel_change": float(((iso1 - iso0).flatten(2).norm(dim=-1) / ref).mean()),
            "fw_rel_change_other_demos": float(((other - iso0).flatten(2).norm(dim=-1) / ref).mean()),
            "demo_part_cosine": float(torch.nn.functional.cosine_similarity(
                d1.demo_part.sum(1), d0.demo_part.sum(1), dim=-1).mean()),
            "prediction_unchanged": float((m["logp"].argmax(-1) == base["logp"].argmax(-1)).float().mean()),
            **m["row"],
        })  # fmt: skip
    return Predictions(
        model_info(model).spec, checked.task.name, shots, tuple(heads), tuple(rep_rows), tuple(noise_rows),
        tuple(order_rows), n, seed, tuple(skipped),
    )  # fmt: skip
