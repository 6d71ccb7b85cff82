"""``shots-and-noise``: accuracy and logit difference against the number of demos and the label-noise rate.

**Grid.** For each task, each number of shots ``k`` and each nominal noise rate ``p``,
:func:`icl_circuits.tasks.scoring.evaluate` scores ``n`` prompts (seed ``seed + k``; the same examples at
every ``p``, only ``round(p k)`` demo labels flipped to another label of the task -- the realised
fraction ``flipped = round(p k) / k`` is reported beside ``p``). Accuracy is argmax over the whole
vocabulary; ``logit_diff = logit[answer] - logit[contrast]`` with the contrast of
:mod:`icl_circuits.tasks.prompts` (the latest demo label other than the answer).

**Shrink toward the mean prediction** (at ``k = noise_shots``). A Bayesian learner given noisier
demonstrations moves its prediction back toward its prior predictive; for a model, that is its
prediction *without* demos -- the zero-shot prompt with the same query, the mean over the tasks it
was trained on. With label log-probabilities ``log q`` (log-softmax over the task's label tokens,
:func:`~icl_circuits.tasks.scoring.label_log_probs`) and the in-context update
``u_p,b = log q(p-noisy prompt b) - log q(zero-shot prompt b)``::

    beta_p = sum_b <u_p,b, u_0,b> / sum_b |u_0,b|^2

the update's component along the clean update (:func:`icl_circuits.tasks.scoring.shrink_coefficient`
with ``labels``; the fast-weight predictions of :mod:`icl_circuits.fast_weights.predictions` use the same
function normalised over the full vocabulary, ``labels=None``).
Sign: ``beta = 1`` no shrink (``p = 0`` by construction), ``0`` back at the zero-shot prediction,
``< 0`` past it. Also ``KL(q_p || q_zero-shot)`` and the label-probability of the clean answer.

Cost: ``len(tasks) * len(shots) * len(noise)`` sets of ``n`` prompts, one forward each per
``batch_size``, plus ``2 * len(noise)`` sets for the shrink (about 10 s on ``fixture:icl-tiny``, 2 CPUs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from icl_circuits.analyze.base import (
    AnalysisMixin,
    TaskArg,
    change,
    check_positive,
    finite,
    fmt,
    pick_tasks,
    task_label,
    uses_corpus_vocab,
)
from icl_circuits.errors import InputError, PromptTooLongError
from icl_circuits.models import model_info
from icl_circuits.report import Section, figure_html, table_html
from icl_circuits.results import series_colors
from icl_circuits.tasks.defaults import run_default
from icl_circuits.tasks.prompts import CheckedTask, build_prompts, check_task, render_prompt
from icl_circuits.tasks.registry import FewShot, get_task
from icl_circuits.tasks.scoring import answer_logits, at_chance, evaluate, label_log_probs, shrink_coefficient

FIXTURE_TASKS = ("fixture-rule", "fixture-bound")
FIXTURE_SHOTS = (0, 1, 2, 4, 8, 12)
LM_SHOTS = (0, 1, 2, 4, 8)
NOISE = (0.0, 0.25, 0.5, 0.75)
PALETTE = ("#4c78a8", "#f58518", "#e45756", "#72b7b2", "#54a24b", "#b279a2")


@dataclass(frozen=True)
class ShotsAndNoise(AnalysisMixin):
    """``grid``: one row per (task, shots, noise) with accuracy, logit difference, probability, rank;
    ``shrink``: one row per (task, noise) at ``noise_shots`` with ``beta``, KL to zero-shot and the
    answer's label probability; ``chance``: 1 / number of labels, per task."""

    name: ClassVar[str] = "shots-and-noise"
    title: ClassVar[str] = "Shots and label noise"
    model: str
    seed: int
    n: int
    noise_shots: int
    grid: tuple[dict[str, Any], ...]
    shrink: tuple[dict[str, Any], ...]
    chance: dict[str, float] = field(default_factory=dict)
    skipped: tuple[str, ...] = ()

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.grid))

    def value(self, task: str, shots: int, noise: float, key: str = "accuracy") -> float | None:
        for r in self.grid:
            if r["task"] == task and r["shots"] == shots and abs(r["noise"] - noise) < 1e-9:
                return r[key]  # type: ignore[no-any-return]
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": self.name, "model": self.model, "seed": self.seed, "n": self.n,
                "noise_shots": self.noise_shots, "chance": dict(self.chance),
                "grid": [dict(r) for r in self.grid], "shrink": [dict(r) for r in self.shrink],
                "skipped": list(self.skipped), "findings": self.findings()}  # fmt: skip

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self.grid))

    def figures(self) -> list[Any]:
        """[accuracy vs shots, logit difference vs shots (a line per noise rate, a panel per task),
        shrink vs noise]. Pure."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        tasks = self.tasks
        figs = []
        for key, label in (("accuracy", "accuracy"), ("logit_diff", "logit difference (answer - contrast)")):
            fig = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
            for j, task in enumerate(tasks, start=1):
                for i, noise in enumerate(sorted({r["noise"] for r in self.grid})):
                    rows = [r for r in self.grid if r["task"] == task and r["noise"] == noise]
                    line = go.Scatter(x=[r["shots"] for r in rows], y=[r[key] for r in rows], mode="lines+markers",
                                      name=f"noise {noise:.2f}", legendgroup=str(noise), showlegend=j == 1,
                                      line={"color": PALETTE[i % len(PALETTE)]})  # fmt: skip
                    fig.add_trace(line, 1, j)
                if key == "accuracy":
                    fig.add_hline(y=self.chance.get(task, 0.0), line_dash="dash", row=1, col=j)
                fig.update_xaxes(title_text="shots", row=1, col=j)
            fig.update_yaxes(title_text=label, row=1, col=1)
            fig.update_layout(title=f"{label} against the number of demos, by label-noise rate (n={self.n})")
            figs.append(fig)
        fig = make_subplots(rows=1, cols=2, subplot_titles=("beta: update along the clean update",
                                                            "accuracy"))  # fmt: skip
        colour = series_colors(sorted(tasks))  # one colour per task in both panels, one legend entry per task
        for task in tasks:
            rows = [r for r in self.shrink if r["task"] == task]
            x = [r["flipped"] for r in rows]
            name = f"{task} (at chance: beta not read)" if self.at_chance(task) else task
            line = {"color": colour[task]}
            fig.add_trace(go.Scatter(x=x, y=[r["beta"] for r in rows], mode="lines+markers", name=name,
                                     legendgroup=task, line=line), 1, 1)  # fmt: skip
            fig.add_trace(go.Scatter(x=x, y=[r["label_accuracy"] for r in rows], mode="lines+markers", name=name,
                                     legendgroup=task, showlegend=False, line=line), 1, 2)  # fmt: skip
        fig.update_yaxes(title_text="beta", row=1, col=1)
        fig.update_yaxes(title_text="accuracy (argmax over the labels)", row=1, col=2)
        fig.add_hline(y=0.0, line_dash="dot", row=1, col=1)
        fig.update_xaxes(title_text="fraction of demo labels flipped")
        fig.update_layout(title=f"Shrink toward the zero-shot prediction at {self.noise_shots} shots")
        figs.append(fig)
        return figs

    def _task_reading(self, task: str) -> str:
        shots = sorted({r["shots"] for r in self.grid if r["task"] == task})
        lo, hi = shots[0], shots[-1]
        a0, a1 = self.value(task, lo, 0.0), self.value(task, hi, 0.0)
        d0, d1 = self.value(task, lo, 0.0, "logit_diff"), self.value(task, hi, 0.0, "logit_diff")
        text = (f"{task}: accuracy {change(a0, a1)} from {lo} to {hi} shots (chance {fmt(self.chance.get(task))}); "
                f"the logit difference {change(d0, d1)}.")  # fmt: skip
        k = self.noise_shots
        noisy = [r for r in self.grid if r["task"] == task and r["shots"] == k and r["noise"] > 0]
        if noisy:
            parts = ", ".join(f"{r['flipped']:.0%} flipped: {fmt(r['accuracy'])}" for r in noisy)
            text += f" At {k} shots, clean accuracy {fmt(self.value(task, k, 0.0))}; {parts}."
        sh = [r for r in self.shrink if r["task"] == task and r["flipped"] > 0]
        if sh and self.at_chance(task):
            text += (f" The clean accuracy at {k} shots, {fmt(self.value(task, k, 0.0))}, is at chance "
                     f"({fmt(self.chance.get(task))}, within 2 standard errors at n = {self.n}): there is no "
                     "in-context update to shrink, so the shrink coefficient beta is not read.")
        elif sh:
            moves = ", ".join(f"{fmt(r['beta'])} at {r['flipped']:.0%}" for r in sh)
            last = sh[-1]["beta"]
            where = ("moves back toward the zero-shot prediction" if last is not None and last < 0.9
                     else "does not move back toward the zero-shot prediction")  # fmt: skip
            text += f" With noise the update {where}: beta = {moves} (1 = no shrink, 0 = zero-shot)."
        return text

    def sections(self) -> list[Section]:
        import pandas as pd

        acc, ld, shrink = self.figures()
        return [
            Section("Accuracy against shots and label noise", figure_html(acc),
                    [self._task_reading(t) for t in self.tasks]),
            Section("Logit difference against shots", figure_html(ld),
                    "Logit difference = logit of the answer minus that of the latest other demo label (or the next "
                    "label of the task); it is unchanged by compatibility mode's per-position constant."),
            Section("Shrink toward the mean (zero-shot) prediction",
                    figure_html(shrink) + table_html(pd.DataFrame(list(self.shrink))), self._shrink_reading()),
            Section("All numbers", table_html(self.to_dataframe(), max_rows=500),
                    f"Skipped: {'; '.join(self.skipped)}." if self.skipped else ""),
        ]  # fmt: skip

    def at_chance(self, task: str) -> bool:
        """Is ``task``'s clean accuracy at :attr:`noise_shots` shots no better than chance (:func:`at_chance`)?"""
        return at_chance(self.value(task, self.noise_shots, 0.0), self.chance.get(task, 0.0), self.n)

    def _shrink_reading(self) -> list[str]:
        out = []
        for task in self.tasks:
            if self.at_chance(task):
                out.append(f"{task}: accuracy at chance at {self.noise_shots} shots; beta and the KL divergence "
                           "are shown but not read (nothing was learnt in context to move back from).")
                continue
            rows = [r for r in self.shrink if r["task"] == task]
            if len(rows) > 1:
                out.append(f"{task} at {self.noise_shots} shots: KL(noisy || zero-shot) "
                           f"{change(rows[0]['kl_to_zero_shot'], rows[-1]['kl_to_zero_shot'])} as the flipped "
                           f"fraction goes from {rows[0]['flipped']:.0%} to {rows[-1]['flipped']:.0%}; the answer's "
                           f"label probability {change(rows[0]['answer_prob'], rows[-1]['answer_prob'])}.")  # fmt: skip
        return out

    def findings(self) -> dict[str, Any]:
        task = self.tasks[0]
        shots = sorted({r["shots"] for r in self.grid if r["task"] == task})
        half = [r for r in self.shrink if r["task"] == task and abs(r["noise"] - 0.5) < 1e-9]
        return {
            "task": task,
            "accuracy_0_shots": self.value(task, shots[0], 0.0),
            "accuracy_max_shots": self.value(task, shots[-1], 0.0),
            "max_shots": shots[-1],
            "accuracy_half_noise": self.value(task, self.noise_shots, 0.5),
            "beta_half_noise": half[0]["beta"] if half and not self.at_chance(task) else None,
            "at_chance": self.at_chance(task),
            "reading": self._task_reading(task),
        }


def _zero_shot_ids(model: Any, checked: CheckedTask, examples: Sequence[FewShot]) -> list[list[int]]:
    return [render_prompt(model, FewShot((), ex.query), checked)[1] for ex in examples]


def _shrink_rows(model: Any, checked: CheckedTask, task: str, k: int, n: int, seed: int,
                 noise: Sequence[float], batch_size: int) -> list[dict[str, Any]]:  # fmt: skip
    labels = torch.tensor(sorted(set(checked.answer_ids.values())))
    clean = build_prompts(model, checked, k, n, seed)
    final_zero = answer_logits(model, _zero_shot_ids(model, checked, [p.example for p in clean.prompts]),
                               batch_size=batch_size)  # fmt: skip
    zero = label_log_probs(final_zero, labels)
    answer_col = (clean.answer_ids[:, None] == labels[None]).float().argmax(-1)  # [batch]: the answer's label index
    rows, final_clean = [], None
    for p in noise:
        ps = clean if p == 0 else build_prompts(model, checked, k, n, seed, noise=p)
        final = answer_logits(model, ps.tokens, batch_size=batch_size)
        logq = label_log_probs(final, labels)
        final_clean = final if final_clean is None else final_clean
        beta = shrink_coefficient(final, final_clean, final_zero, labels)  # renormalised over the task's labels
        kl = float((logq.exp() * (logq - zero)).sum(-1).mean())
        rows.append({
            "task": task, "shots": k, "noise": float(p), "flipped": round(p * k) / k,
            "beta": finite(beta), "kl_to_zero_shot": finite(kl),
            "answer_prob": float(logq.gather(1, answer_col[:, None]).exp().mean()),
            "label_accuracy": float((labels[logq.argmax(-1)] == ps.answer_ids).float().mean()),
        })  # fmt: skip
    return rows


def run_shots_and_noise(
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    shots: Sequence[int] | None = None,
    noise: Sequence[float] = NOISE,
    noise_shots: int = 8,
    batch_size: int = 32,
    progress: bool = True,
) -> ShotsAndNoise:
    """Accuracy/logit difference on a shots x noise grid, and the shrink toward zero-shot (module doc).

    Defaults: tasks ``fixture-rule, fixture-bound`` on the fixture vocabulary, else ``antonym,
    country-capital``; shots ``0,1,2,4,8,12`` (fixture) or ``0,1,2,4,8``; ``n = 64`` prompts per cell.
    Shot counts above a task's maximum or the model's context are dropped.

    Raises:
        InputError: bad ``n``/``noise``; TaskError: unknown task.
    """
    n = run_default(model, "shots-and-noise", "n", n)
    check_positive(n=n, noise_shots=noise_shots)
    rates = sorted({float(p) for p in noise} | {0.0})
    if any(not 0.0 <= p <= 1.0 for p in rates):
        raise InputError(f"noise rates must be in [0, 1], got {list(noise)}")
    names = pick_tasks(model, tasks, FIXTURE_TASKS, min_shots=4)
    if shots is None:
        shots = FIXTURE_SHOTS if uses_corpus_vocab(model) else LM_SHOTS
    grid: list[dict[str, Any]] = []
    shrink: list[dict[str, Any]] = []
    chance: dict[str, float] = {}
    skipped: list[str] = []
    for given in tqdm(names, desc="shots-and-noise", disable=not progress):
        name = task_label(given)
        checked = check_task(model, get_task(given, model))
        chance[name] = 1.0 / len(checked.task.labels)
        for k in shots:
            if k > checked.task.max_shots:
                skipped.append(f"{name}: {k} shots (at most {checked.task.max_shots})")
                continue
            for p in rates if k > 0 else [0.0]:  # zero shots: nothing to flip
                try:
                    ev = evaluate(model, checked.task, [k], n=n, seed=seed, noise=p, batch_size=batch_size)
                except PromptTooLongError:
                    skipped.append(f"{name}: {k} shots (longer than the context)")
                    break
                r = ev.rows[0]
                grid.append({"task": name, "shots": k, "noise": p, "flipped": round(p * k) / k if k else 0.0,
                             "n": n, "accuracy": r["accuracy"], "logit_diff": finite(r["logit_diff"]),
                             "prob": r["prob"], "mean_rank": r["mean_rank"]})  # fmt: skip
    for given in names:
        name = task_label(given)
        checked = check_task(model, get_task(given, model))
        k = min(noise_shots, checked.task.max_shots)
        try:
            shrink += _shrink_rows(model, checked, name, k, n, seed + k, rates, batch_size)
        except PromptTooLongError:
            skipped.append(f"{name}: the shrink at {k} shots (longer than the context)")
    return ShotsAndNoise(model_info(model).spec, seed, n, noise_shots, tuple(grid), tuple(shrink), chance,
                         tuple(dict.fromkeys(skipped)))
