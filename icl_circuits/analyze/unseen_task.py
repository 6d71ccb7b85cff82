"""``unseen-task``: tasks whose rule never occurred in training -- accuracy by shots, and the heads responsible.

**Tasks.** On the fixture vocabulary: the rule tasks ``fixture-rule-shiftS`` for every trained shift
``S`` (``train_shifts`` of the model's ``corpus.json``) are *seen*; shifts up to 8 outside them are
*unseen* (held out of training; the query is never among the demos, so the demos must reveal the
shift). For other models: two task files (``antonym``, ``country-capital``) are seen, and the
arbitrary-map tasks of :data:`icl_circuits.tasks.registry.UNSEEN_TASKS` (``arbitrary-country-word``,
``arbitrary-word-symbol``: a random map fixed by a seed, so no pretraining text holds it; the query is
among the demos) are unseen. Given names are classified the same way (``:substituted``,
``fixture-bound-unseen``, the arbitrary-map tasks and untrained shifts are unseen); when none of them
is unseen, their substituted variants are added.

**Accuracy by shots** (:func:`icl_circuits.tasks.scoring.evaluate`, seed ``seed + k`` at ``k`` shots), per
task and averaged per group.

**Heads responsible.** At ``head_shots`` demos, each head is mean-ablated alone
(:func:`icl_circuits.patching.ablation.mean_ablation_sweep`, metric
:class:`~icl_circuits.patching.ablation.LogitDiff`); its effect is the change of the mean logit
difference ``LD = logit[answer] - logit[contrast]``, ablated minus clean (negative: the head supports the answer),
averaged over the tasks of a group. The heads with the most negative effect on unseen tasks are the
ones responsible; the Pearson correlation of the per-head effects between the groups says whether
seen and unseen tasks use the same heads.

Cost: ``len(tasks) * len(shots)`` sets of ``n`` prompts, then per task one forward of ``n`` prompts
and each layer's heads tiled into a run resumed at that layer (the sweep's cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
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
    uses_corpus_vocab,
)
from icl_circuits.errors import PromptTooLongError
from icl_circuits.models import model_info
from icl_circuits.patching.ablation import LogitDiff, mean_ablation_sweep
from icl_circuits.patching.atp import pearson
from icl_circuits.report import Section, figure_html, table_html
from icl_circuits.tasks import corpus
from icl_circuits.tasks.defaults import run_default
from icl_circuits.tasks.prompts import build_prompts, check_task
from icl_circuits.tasks.registry import (
    SUBSTITUTED_SUFFIX,
    UNSEEN_TASKS,
    ArbitraryMapTask,
    FixtureTask,
    SubstitutedTask,
    corpus_config_for,
    get_task,
)
from icl_circuits.tasks.scoring import at_chance, evaluate, padded_batch

FIXTURE_SHOTS = (0, 1, 2, 4, 8)
GROUPS = ("seen", "unseen")


def classify(task: TaskArg, cfg: corpus.CorpusConfig) -> str:
    """``"unseen"`` for substituted tasks, ``fixture-bound-unseen``, the arbitrary-map tasks
    (:data:`~icl_circuits.tasks.registry.UNSEEN_TASKS`, or any ``ArbitraryMapTask``) and shifts outside
    ``cfg.train_shifts``; a ``Task`` is classified by its type and shift, then by its name."""
    if isinstance(task, SubstitutedTask | ArbitraryMapTask):
        return "unseen"
    if isinstance(task, FixtureTask) and task.family == "rule" and task.shift is not None:
        return "seen" if task.shift in cfg.train_shifts else "unseen"
    name = task_label(task)
    if name.endswith(SUBSTITUTED_SUFFIX) or name == "fixture-bound-unseen" or name in UNSEEN_TASKS:
        return "unseen"
    if name.startswith("fixture-rule-shift") and name[len("fixture-rule-shift") :].isdigit():
        return "seen" if int(name[len("fixture-rule-shift") :]) in cfg.train_shifts else "unseen"
    return "seen"


def default_tasks(model: Any) -> list[TaskArg]:
    """Trained and held-out shifts (fixture vocabulary), else two task files and the arbitrary-map tasks."""
    if uses_corpus_vocab(model):
        cfg = corpus_config_for(model)
        held = [s for s in range(1, 9) if s not in cfg.train_shifts]
        return [f"fixture-rule-shift{s}" for s in (*cfg.train_shifts, *held)]
    return [*pick_tasks(model, None, (), min_shots=2), *UNSEEN_TASKS]


@dataclass(frozen=True)
class UnseenTask(AnalysisMixin):
    """``rows``: one per (task, shots) with the task's group and its scores; ``head_effects``: per group,
    ``[layer, head]`` mean change of ``LD`` when the head is mean-ablated (at ``head_shots``)."""

    name: ClassVar[str] = "unseen-task"
    title: ClassVar[str] = "Unseen tasks: accuracy by shots and the heads responsible"
    model: str
    seed: int
    n: int
    head_shots: int
    rows: tuple[dict[str, Any], ...]
    head_effects: dict[str, torch.Tensor]

    def group_curve(self, group: str, key: str = "accuracy") -> dict[int, float]:
        """Mean of ``key`` over the group's tasks, by shots."""
        out: dict[int, list[float]] = {}
        for r in self.rows:
            if r["group"] == group:
                out.setdefault(r["shots"], []).append(r[key])
        return {k: sum(v) / len(v) for k, v in sorted(out.items())}

    def top_heads(self, group: str = "unseen", k: int = 3) -> list[tuple[tuple[int, int], float]]:
        """The ``k`` heads whose ablation lowers the group's ``LD`` most: ``((layer, head), effect)``."""
        eff = self.head_effects[group]
        idx = torch.argsort(eff.flatten())[:k]
        H = eff.shape[1]
        return [((int(i) // H, int(i) % H), float(eff.flatten()[i])) for i in idx]

    def head_correlation(self) -> float | None:
        if not all(g in self.head_effects for g in GROUPS):
            return None
        return pearson(self.head_effects["seen"].flatten(), self.head_effects["unseen"].flatten())

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": self.name, "model": self.model, "seed": self.seed, "n": self.n,
                "head_shots": self.head_shots, "rows": [dict(r) for r in self.rows],
                "head_effects": {g: v.tolist() for g, v in self.head_effects.items()},
                "findings": self.findings()}  # fmt: skip

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(list(self.rows))

    def figures(self) -> list[Any]:
        """[accuracy by shots per task (seen solid, unseen dashed), head-ablation heatmaps per group]. Pure."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        acc = go.Figure()
        for task in dict.fromkeys(r["task"] for r in self.rows):
            rows = [r for r in self.rows if r["task"] == task]
            acc.add_trace(go.Scatter(x=[r["shots"] for r in rows], y=[r["accuracy"] for r in rows],
                                     mode="lines+markers", name=f"{task} ({rows[0]['group']})",
                                     line={"dash": "dash" if rows[0]["group"] == "unseen" else "solid"}))  # fmt: skip
        acc.update_layout(title=f"Accuracy by shots, seen (solid) and unseen (dashed) tasks (n={self.n})",
                          xaxis_title="shots", yaxis_title="accuracy", yaxis_range=[0, 1.05])  # fmt: skip
        groups = [g for g in GROUPS if g in self.head_effects]
        heads = make_subplots(rows=1, cols=len(groups), subplot_titles=[f"{g} tasks" for g in groups])
        bound = max(float(v.abs().max()) for v in self.head_effects.values()) or 1.0
        for j, g in enumerate(groups, start=1):
            eff = self.head_effects[g]
            hm = go.Heatmap(z=eff.numpy(), x=[f"H{h}" for h in range(eff.shape[1])],
                            y=[f"L{l}" for l in range(eff.shape[0])], coloraxis="coloraxis")  # fmt: skip
            heads.add_trace(hm, 1, j)
        heads.update_yaxes(autorange="reversed")
        heads.update_layout(coloraxis={"colorscale": "RdBu", "cmid": 0.0, "cmin": -bound, "cmax": bound,
                                       "colorbar": {"title": "change of LD"}},
                            title=f"Mean-ablating one head at {self.head_shots} shots: change of the logit "
                                  "difference")  # fmt: skip
        return [acc, heads]

    def group_at_chance(self, group: str) -> bool:
        """Is every task of ``group`` at chance (:func:`at_chance`) at its most shots?"""
        last: dict[str, dict[str, Any]] = {}
        for r in self.rows:
            if r["group"] == group and r["shots"] >= last.get(r["task"], {"shots": -1})["shots"]:
                last[r["task"]] = r
        return bool(last) and all(at_chance(r["accuracy"], r["chance"], int(r["n"])) for r in last.values())

    def reading(self) -> str:
        parts = []
        for g in GROUPS:
            curve = self.group_curve(g)
            if curve:
                ks = list(curve)
                tasks = sorted({r["task"] for r in self.rows if r["group"] == g})
                parts.append(f"{g} tasks ({', '.join(tasks)}): mean accuracy {change(curve[ks[0]], curve[ks[-1]])} "
                             f"from {ks[0]} to {ks[-1]} shots")  # fmt: skip
        text = "; ".join(parts) + "."
        if "unseen" in self.head_effects and self.group_at_chance("unseen"):
            text += (" The unseen tasks stay at chance at their most shots: the model does not learn them in "
                     "context, so no head is read as responsible for them.")
        elif "unseen" in self.head_effects:
            top = ", ".join(f"{head_name(h)} ({e:+.2f})" for h, e in self.top_heads("unseen"))
            text += (f" Heads whose ablation lowers the unseen tasks' logit difference most at {self.head_shots} "
                     f"shots: {top}.")
        corr = self.head_correlation()
        if corr is not None and not self.group_at_chance("unseen") and not self.group_at_chance("seen"):
            top_seen = ", ".join(head_name(h) for h, _ in self.top_heads("seen"))
            text += (f" For seen tasks: {top_seen}; the per-head effects of the two groups correlate at r = "
                     f"{fmt(corr)} over heads.")  # fmt: skip
        return text

    def sections(self) -> list[Section]:
        acc, heads = self.figures()
        return [
            Section("Accuracy by shots", figure_html(acc), self.reading()),
            Section("Heads responsible (single-head mean ablation)", figure_html(heads),
                    "Effect = mean logit difference with the head's hook_z replaced by its per-position mean over the "
                    "task's prompts, minus the clean one; negative = the head supports the answer."),
            Section("Numbers", table_html(self.to_dataframe(), max_rows=200)),
        ]  # fmt: skip

    def findings(self) -> dict[str, Any]:
        seen, unseen = self.group_curve("seen"), self.group_curve("unseen")
        chance = self.group_at_chance("unseen")
        top = self.top_heads("unseen", 1) if "unseen" in self.head_effects and not chance else []
        return {
            "seen_accuracy_max_shots": list(seen.values())[-1] if seen else None,
            "unseen_accuracy_0_shots": list(unseen.values())[0] if unseen else None,
            "unseen_accuracy_max_shots": list(unseen.values())[-1] if unseen else None,
            "max_shots": max((r["shots"] for r in self.rows), default=None),
            "top_unseen_head": head_name(top[0][0]) if top else None,
            "unseen_at_chance": chance,
            "head_effect_correlation": self.head_correlation(),
            "reading": self.reading(),
        }


def run_unseen_task(
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    shots: Sequence[int] | None = None,
    head_shots: int = 8,
    batch_size: int = 64,
    progress: bool = True,
) -> UnseenTask:
    """Accuracy by shots of seen and unseen tasks, and single-head ablation effects (module doc).

    Defaults: ``n = 48`` prompts per (task, shots); shots ``0, 1, 2, 4, 8`` (cut at the context).

    Raises:
        InputError: bad sizes; TaskError: an empty task list, two tasks with one name, or an unknown task.
    """
    n = run_default(model, "unseen-task", "n", n)
    check_positive(n=n, head_shots=head_shots)
    names: list[TaskArg] = list(default_tasks(model)) if tasks is None else pick_tasks(model, tasks, ())
    cfg = corpus_config_for(model)
    if all(classify(t, cfg) == "seen" for t in names):  # no unseen task given: add the substituted variants
        names += [t + SUBSTITUTED_SUFFIX if isinstance(t, str) else SubstitutedTask(t) for t in names]
    groups = {task_label(t): classify(t, cfg) for t in names}
    shots = FIXTURE_SHOTS if shots is None else shots
    rows: list[dict[str, Any]] = []
    sums: dict[str, list[torch.Tensor]] = {}
    used: list[int] = []  # the shots of each task's ablation sweep (head_shots, or fewer where the task allows fewer)
    for given in tqdm(names, desc="unseen-task", disable=not progress):
        name = task_label(given)
        checked = check_task(model, get_task(given, model))
        for k in [k for k in shots if k <= checked.task.max_shots]:
            try:
                ev = evaluate(model, checked.task, [k], n=n, seed=seed, batch_size=batch_size)
            except PromptTooLongError:
                break
            r = ev.rows[0]
            rows.append({"task": name, "group": groups[name], "shots": k, "n": n, "chance": ev.chance,
                         "accuracy": r["accuracy"], "logit_diff": r["logit_diff"], "prob": r["prob"]})  # fmt: skip
        k = min(head_shots, max(r["shots"] for r in rows if r["task"] == name))
        if k >= 1:
            used.append(k)
            ps = build_prompts(model, checked, k, n, seed + k)
            padded, last = padded_batch(model, ps.tokens)
            ld = LogitDiff(ps.answer_ids, ps.contrast_ids, last)
            eff = mean_ablation_sweep(model, padded, ld, last_positions=last).effect
            sums.setdefault(groups[name], []).append(eff)
    effects = {g: torch.stack(v).mean(0) for g, v in sums.items()}
    return UnseenTask(model_info(model).spec, seed, n, max(used, default=head_shots), tuple(rows), effects)
