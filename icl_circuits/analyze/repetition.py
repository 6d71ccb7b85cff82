"""``repetition``: the same demos repeated ``r`` times -- the effect on the prediction and on the fast weights.

**Prompts.** ``n`` prompts of ``k`` demos per task (``build_prompts(..., repeat=r)``: the same examples
for every ``r``, the demo block written ``r`` times in a row, the query unchanged). Repetitions whose
prompts exceed the model's context are skipped and listed.

**Prediction.** Per ``r``: accuracy (argmax over the vocabulary), ``logit_diff = logit[answer] -
logit[contrast]``, the answer's probability, and ``unchanged``: the share of prompts whose argmax
equals the one at ``r = 1``.

**Fast weights** (:mod:`icl_circuits.fast_weights.decompose`). The heads are the ``n_heads`` whose demo part
``c_D`` gives the answer the largest logit-lens logit at ``r = 1`` (``FastWeights.best``); per ``r``,
:func:`icl_circuits.fast_weights.predictions.measure_predictions` gives ``|dW_lin|_F`` (the linear
dual form ``sum_{s in demos} u_s k~_s^T / sqrt(d_head)``, mean over heads and prompts), ``|c_D|`` (the
demo part of the heads' outputs, summed over heads) and the demo part's answer logit. If each copy
of a demo token contributed the same ``u_s k~_s^T``, ``|dW_lin|`` would grow exactly ``r``-fold, while
softmax attention renormalises, so ``|c_D|`` need not grow; the ratios to ``r = 1`` are reported.

Cost: one forward of ``n`` prompts per ``r`` for the prediction; one decomposition forward of all
heads, then (``measure_predictions``) two forwards per ``r`` plus three more.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from tqdm.auto import tqdm

from icl_circuits.analyze.base import (
    AnalysisMixin,
    TaskArg,
    change,
    check_positive,
    fmt,
    head_name,
    pick_tasks,
    task_label,
)
from icl_circuits.errors import PromptTooLongError
from icl_circuits.fast_weights import decompose as fw
from icl_circuits.fast_weights.predictions import measure_predictions
from icl_circuits.models import model_info
from icl_circuits.report import Section, figure_html, table_html
from icl_circuits.results import series_colors
from icl_circuits.tasks.defaults import run_default
from icl_circuits.tasks.prompts import build_prompts, check_task
from icl_circuits.tasks.registry import get_task
from icl_circuits.tasks.roles import render_examples
from icl_circuits.tasks.scoring import answer_logits, at_chance, scores_from_logits

FIXTURE_TASKS = ("fixture-bound", "fixture-rule")
REPEATS = (1, 2, 3)


@dataclass(frozen=True)
class Repetition(AnalysisMixin):
    """``rows``: one per (task, r) with the prediction measures and, where measured, the fast-weight ones
    (``fw_norm``, ``demo_norm``, ``demo_answer_logit``, ``*_ratio`` to ``r = 1``); ``heads``: per task."""

    name: ClassVar[str] = "repetition"
    title: ClassVar[str] = "Repeating the demos: the prediction and the fast weights"
    model: str
    seed: int
    n: int
    shots: int
    heads: dict[str, tuple[tuple[int, int], ...]]
    rows: tuple[dict[str, Any], ...]
    skipped: tuple[str, ...] = ()

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": self.name, "model": self.model, "seed": self.seed, "n": self.n, "shots": self.shots,
                "heads": {t: [list(h) for h in hs] for t, hs in self.heads.items()},
                "rows": [dict(r) for r in self.rows], "skipped": list(self.skipped),
                "findings": self.findings()}  # fmt: skip

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self.rows))

    def figures(self) -> list[Any]:
        """[prediction against r, fast-weight magnitudes relative to r = 1]. Pure."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        pred = make_subplots(rows=1, cols=2, subplot_titles=("accuracy", "logit difference"))
        mag = go.Figure()
        colour = series_colors(sorted(self.tasks))  # by name: the same task, the same colour on every page
        for task in self.tasks:
            rows = [r for r in self.rows if r["task"] == task]
            x = [r["repeat"] for r in rows]
            line = {"color": colour[task]}
            pred.add_trace(go.Scatter(x=x, y=[r["accuracy"] for r in rows], mode="lines+markers", name=task,
                                      legendgroup=task, line=line), 1, 1)  # fmt: skip
            pred.add_trace(go.Scatter(x=x, y=[r["logit_diff"] for r in rows], mode="lines+markers", name=task,
                                      legendgroup=task, showlegend=False, line=line), 1, 2)  # fmt: skip
            for key, label, dash in (("fw_norm_ratio", "|dW_lin|", "solid"), ("demo_norm_ratio", "|c_D|", "dash")):
                pts = [(r["repeat"], r.get(key)) for r in rows if r.get(key) is not None]
                mag.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="lines+markers",
                                         name=f"{task} {label}", line={**line, "dash": dash}))  # fmt: skip
        top = max((r["repeat"] for r in self.rows), default=1)
        mag.add_trace(go.Scatter(x=[1, top], y=[1, top], mode="lines", line={"dash": "dot", "color": "#888888"},
                                 name="r-fold"))  # fmt: skip
        pred.update_xaxes(title_text="r (times the demo block is written)", dtick=1)
        mag.update_xaxes(dtick=1)
        pred.update_xaxes(title_text="r (times the demo block is written)")
        pred.update_layout(title=f"The prediction with the demos repeated ({self.shots} demos, n={self.n})")
        mag.update_layout(title="Fast-weight magnitude relative to r = 1 (mean over the chosen heads)",
                          xaxis_title="r", yaxis_title="ratio to r = 1")  # fmt: skip
        return [pred, mag]

    def at_chance(self, task: str) -> bool:
        """Is ``task``'s accuracy at chance (:func:`at_chance`) at every ``r``? Rows without ``chance``: ``False``."""
        rows = [r for r in self.rows if r["task"] == task]
        return bool(rows) and all("chance" in r and at_chance(r["accuracy"], r["chance"], self.n) for r in rows)

    def _reading(self, task: str) -> str:
        rows = [r for r in self.rows if r["task"] == task]
        a, b = rows[0], rows[-1]
        if self.at_chance(task):
            text = (f"{task}, {self.shots} demos written r = {a['repeat']}..{b['repeat']} times: accuracy "
                    f"{fmt(a['accuracy'])} to {fmt(b['accuracy'])}, at chance ({fmt(a['chance'])}, within 2 standard "
                    f"errors at n = {self.n}) at every r: the demos drive no prediction, so the effect of repeating "
                    "them on the prediction is not read.")  # fmt: skip
            if b.get("fw_norm_ratio") is not None:
                text += (f" Measured all the same: |dW_lin| x{fmt(b['fw_norm_ratio'])}, |c_D| "
                         f"x{fmt(b['demo_norm_ratio'])} at r = {b['repeat']}.")
            return text
        text = (f"{task}, {self.shots} demos written r = {a['repeat']}..{b['repeat']} times: accuracy "
                f"{change(a['accuracy'], b['accuracy'])}, logit difference {change(a['logit_diff'], b['logit_diff'])}, "
                f"answer probability {change(a['prob'], b['prob'])}; {fmt(b['unchanged'])} of the predictions are the "
                f"same as at r = 1.")  # fmt: skip
        if b.get("fw_norm_ratio") is not None:
            heads = ", ".join(head_name(h) for h in self.heads.get(task, ()))
            text += (f" Over heads {heads}: |dW_lin| x{fmt(b['fw_norm_ratio'])} and |c_D| x{fmt(b['demo_norm_ratio'])}"
                     f" at r = {b['repeat']} (r-fold growth would be x{b['repeat']}).")  # fmt: skip
        return text

    def sections(self) -> list[Section]:
        pred, mag = self.figures()
        return [
            Section("The prediction", figure_html(pred), [self._reading(t) for t in self.tasks]),
            Section("Fast-weight magnitude", figure_html(mag),
                    "|dW_lin|_F: Frobenius norm of the linear dual form over the demo tokens, mean over the chosen "
                    "heads and prompts; |c_D|: norm of the demos' part of the heads' outputs (summed over heads)."),
            Section("Numbers", table_html(self.to_dataframe(), max_rows=100),
                    f"Skipped: {'; '.join(self.skipped)}." if self.skipped else ""),
        ]  # fmt: skip

    def findings(self) -> dict[str, Any]:
        task = self.tasks[0]
        rows = [r for r in self.rows if r["task"] == task]
        return {"task": task, "max_repeat": rows[-1]["repeat"], "accuracy_r1": rows[0]["accuracy"],
                "accuracy_max_r": rows[-1]["accuracy"], "unchanged_max_r": rows[-1]["unchanged"],
                "fw_norm_ratio_max_r": rows[-1].get("fw_norm_ratio"),
                "demo_norm_ratio_max_r": rows[-1].get("demo_norm_ratio"), "at_chance": self.at_chance(task),
                "reading": self._reading(task)}  # fmt: skip


def top_demo_heads(model: Any, task: Any, shots: int, n: int, seed: int, n_heads: int) -> list[tuple[int, int]]:
    """The ``n_heads`` heads whose demo part gives the answer the largest logit-lens logit (``FastWeights.best``)."""
    import numpy as np

    checked = check_task(model, task)
    rng = np.random.default_rng(seed)
    examples = [checked.task.draw(rng, shots) for _ in range(n)]
    tokens, roles, answers, contrasts = render_examples(model, checked, examples)
    dec = fw.decompose(model, tokens, roles)
    return fw.summarize(model, dec, answers, contrasts, task=checked.task.name, shots=shots).best(n_heads)


def run_repetition(
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    shots: int | None = None,
    repeats: Sequence[int] = REPEATS,
    n_heads: int = 4,
    fast_weights: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> Repetition:
    """The prediction and the fast-weight magnitude with the demo block repeated ``r`` times (module doc).

    Defaults: ``n = 64`` prompts, ``shots = 4``, ``repeats = 1, 2, 3``, the 4 heads with the largest demo
    answer logit. ``fast_weights=False`` skips the fast-weight measures.

    Raises:
        InputError: bad sizes; TaskError: unknown task, fewer than 2 shots for the fast weights.
    """
    n = run_default(model, "repetition", "n", n)
    k = run_default(model, "repetition", "shots", shots)
    rs = sorted({int(r) for r in repeats} | {1})
    check_positive(n=n, shots=k, n_heads=n_heads, **{f"repeat_{r}": r for r in rs})
    names = pick_tasks(model, tasks, FIXTURE_TASKS, min_shots=k)
    rows: list[dict[str, Any]] = []
    heads: dict[str, tuple[tuple[int, int], ...]] = {}
    skipped: list[str] = []
    for given in tqdm(names, desc="repetition", disable=not progress):
        name = task_label(given)
        checked = check_task(model, get_task(given, model))
        task_rows, first = [], None
        for r in rs:
            try:
                ps = build_prompts(model, checked, k, n, seed, repeat=r)
            except PromptTooLongError:
                skipped.append(f"{name}: r = {r} (longer than the context)")
                continue
            final = answer_logits(model, ps.tokens, batch_size=batch_size)
            s = scores_from_logits(final, ps.answer_ids, ps.contrast_ids)
            first = final.argmax(-1) if first is None else first
            task_rows.append({"task": name, "repeat": r, "shots": k, "n": n, "chance": 1.0 / len(checked.task.labels),
                              "accuracy": s.accuracy,
                              "logit_diff": float(s.logit_diff.mean()), "prob": float(s.prob.mean()),
                              "unchanged": float((final.argmax(-1) == first).float().mean())})  # fmt: skip
        if not task_rows:
            continue
        if fast_weights and k >= 2:
            n_top = min(n_heads, int(model.cfg.n_layers) * int(model.cfg.n_heads))
            chosen = top_demo_heads(model, checked.task, k, n, seed, n_top)
            heads[name] = tuple(chosen)
            done = [row["repeat"] for row in task_rows]
            pred = measure_predictions(model, checked.task, k, chosen, n=n, seed=seed, repeats=done,
                                       noise=(0.0,), n_orders=0)  # fmt: skip
            by_r = {p["repeat"]: p for p in pred.repetition}
            base = by_r.get(1)
            for row in task_rows:
                p = by_r.get(row["repeat"])
                if p is None or base is None:
                    continue
                row.update(fw_norm=p["fw_norm"], demo_norm=p["demo_norm"], demo_answer_logit=p["demo_answer_logit"],
                           fw_norm_ratio=p["fw_norm"] / max(base["fw_norm"], 1e-30),
                           demo_norm_ratio=p["demo_norm"] / max(base["demo_norm"], 1e-30))  # fmt: skip
        rows += task_rows
    if not rows:
        raise PromptTooLongError(f"every repetition is longer than the context of {model_info(model).spec!r}: "
                                 f"{'; '.join(skipped)}; use fewer shots")  # fmt: skip
    return Repetition(model_info(model).spec, seed, n, k, heads, tuple(rows), tuple(skipped))
