"""``order``: sensitivity to demo order (Lu et al. 2022), with and without contextual calibration (Zhao et al. 2021).

**Design** (Lu et al., "Fantastically ordered prompts"). For each task, ``n`` *demo sets* of ``k``
demos are drawn; each set is shown in ``n_orders`` orders (all ``k!`` when that is fewer; else the
drawn order plus random distinct permutations) and, in every order, answers the same queries: up to
``queries`` inputs outside the demos whose answer the task fixes (``task.lookup``; a fixture task
whose rule or recorded map is drawn per prompt gets one drawn per demo set), or, for tasks bound
afresh per prompt (``fixture-bound``, substituted labels), the demo inputs themselves. The metric of
a (set, order) is the mean over its queries; its **spread** over orders, per set, is the range
(max - min) and the standard deviation; reported as means over sets.

**Contextual calibration** (Zhao et al., "Calibrate before use"). For each (set, order) the query is
replaced by a content-free input -- ``"N/A"`` for language models; for the fixture vocabulary a digit
that is not a label of the task (``"0"``), since digits are never keys or labels there -- and the
label probabilities ``p_cf`` (softmax over the task's label tokens) are read at the answer position.
Calibrated label probabilities are ``W p`` with ``W = diag(p_cf)^-1`` (bias 0), renormalised; so
``log q_cal = log q - log p_cf + const`` and the calibrated logit difference is
``LD - (log p_cf[answer] - log p_cf[contrast])``. Accuracy: argmax over the whole vocabulary
(uncalibrated, as :mod:`icl_circuits.tasks.scoring`), over the labels (``label_accuracy``) and over the
calibrated labels (``calibrated_accuracy``). The contrast of each query is fixed across orders (the
latest other demo label in the drawn order), so logit differences are comparable across orders.

**Heads.** Each head's direct logit attribution to ``LD`` at the answer position
(:func:`~icl_circuits.analyze.base.head_logit_attribution`), averaged over a (set, order)'s queries;
its **order sensitivity** is the standard deviation over orders, averaged over sets (in logits; the
same units as the spread of ``LD``).

Cost: ``n * n_orders * (queries + 1)`` prompts; two forwards each (logits, attribution cache).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from icl_circuits.analyze.base import (
    AnalysisMixin,
    TaskArg,
    change,
    check_positive,
    fmt,
    head_logit_attribution,
    head_name,
    pick_tasks,
    task_label,
    uses_corpus_vocab,
)
from icl_circuits.errors import TaskError
from icl_circuits.models import model_info
from icl_circuits.report import Section, figure_html, table_html
from icl_circuits.tasks import corpus
from icl_circuits.tasks.defaults import run_default
from icl_circuits.tasks.prompts import CheckedTask, check_length, check_task, encode, render_prompt
from icl_circuits.tasks.registry import FewShot, FixtureTask, Pair, PairTask, Task, get_task
from icl_circuits.tasks.scoring import answer_logits, at_chance, label_log_probs

FIXTURE_TASKS = ("fixture-bound", "fixture-rule")
METRICS = ("accuracy", "label_accuracy", "calibrated_accuracy", "logit_diff", "calibrated_logit_diff")


@dataclass(frozen=True)
class OrderSensitivity(AnalysisMixin):
    """``rows``: one per (task, demo set, order) with the metrics of :data:`METRICS` (means over queries);
    ``head_sd``: per task, ``[layer, head]`` standard deviation over orders of the head's attribution
    (mean over sets); ``head_mean_abs``: per task, the mean ``|attribution|``."""

    name: ClassVar[str] = "order"
    title: ClassVar[str] = "Sensitivity to demo order, with contextual calibration"
    model: str
    seed: int
    shots: int
    n_sets: int
    n_orders: int
    content_free: dict[str, str]
    rows: tuple[dict[str, Any], ...]
    head_sd: dict[str, torch.Tensor]
    head_mean_abs: dict[str, torch.Tensor]

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(r["task"] for r in self.rows))

    def spread(self, task: str, metric: str) -> dict[str, float]:
        """Mean over demo sets of the range and standard deviation over orders, and the grand mean."""
        by_set: dict[int, list[float]] = {}
        for r in self.rows:
            if r["task"] == task:
                by_set.setdefault(r["set"], []).append(r[metric])
        vals = [np.asarray(v, dtype=float) for v in by_set.values()]
        return {"mean": float(np.mean([v.mean() for v in vals])),
                "range": float(np.mean([v.max() - v.min() for v in vals])),
                "sd": float(np.mean([v.std() for v in vals]))}  # fmt: skip

    def summary(self) -> list[dict[str, Any]]:
        """One row per (task, metric): mean, range and sd over orders (means over sets)."""
        return [{"task": t, "metric": m, **self.spread(t, m)} for t in self.tasks for m in METRICS]

    def top_heads(self, task: str, k: int = 3) -> list[tuple[tuple[int, int], float, float]]:
        """The ``k`` heads whose attribution moves most with order: ``((layer, head), sd, mean |dla|)``."""
        sd, mabs = self.head_sd[task], self.head_mean_abs[task]
        order = torch.argsort(sd.flatten(), descending=True)[:k]
        H = sd.shape[1]
        return [((int(i) // H, int(i) % H), float(sd.flatten()[i]), float(mabs.flatten()[i])) for i in order]

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": self.name, "model": self.model, "seed": self.seed, "shots": self.shots,
            "n_sets": self.n_sets, "n_orders": self.n_orders, "content_free": dict(self.content_free),
            "summary": self.summary(), "rows": [dict(r) for r in self.rows],
            "head_order_sd": {t: v.tolist() for t, v in self.head_sd.items()},
            "head_mean_abs_attribution": {t: v.tolist() for t, v in self.head_mean_abs.items()},
            "findings": self.findings(),
        }  # fmt: skip

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.summary())

    def figures(self) -> list[Any]:
        """[accuracy per demo set and order (raw vs calibrated), head order-sensitivity heatmaps]. Pure."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        tasks = self.tasks
        acc = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks, shared_yaxes=True)
        for j, task in enumerate(tasks, start=1):
            rows = [r for r in self.rows if r["task"] == task]
            for key, name, color in (("label_accuracy", "uncalibrated", "#4c78a8"),
                                     ("calibrated_accuracy", "calibrated", "#e45756")):  # fmt: skip
                box = go.Box(x=[f"set {r['set'] + 1}" for r in rows], y=[r[key] for r in rows], name=name,
                             legendgroup=name, showlegend=j == 1, boxpoints="all", jitter=0.4,
                             marker_color=color)  # fmt: skip
                acc.add_trace(box, 1, j)
        acc.update_layout(boxmode="group", yaxis_title="accuracy (argmax over labels) on the set's queries",
                          title=f"Accuracy of each demo set in {self.n_orders} orders ({self.shots} demos)")
        heads = make_subplots(rows=1, cols=len(tasks), subplot_titles=tasks)
        for j, task in enumerate(tasks, start=1):
            sd = self.head_sd[task]
            heads.add_trace(go.Heatmap(z=sd.numpy(), x=[f"H{h}" for h in range(sd.shape[1])],
                                       y=[f"L{l}" for l in range(sd.shape[0])], colorscale="Blues",
                                       coloraxis="coloraxis"), 1, j)  # fmt: skip
        heads.update_yaxes(autorange="reversed")
        heads.update_layout(coloraxis={"colorscale": "Blues", "colorbar": {"title": "sd (logits)"}},
                            title="Standard deviation over orders of each head's direct logit attribution")  # fmt: skip
        return [acc, heads]

    def at_chance(self, task: str) -> bool:
        """Is ``task``'s mean label accuracy no better than chance (:func:`at_chance`, ``n``: the distinct
        queries of one order, summed over demo sets)? Rows without ``chance`` (older JSON): ``False``."""
        rows = [r for r in self.rows if r["task"] == task]
        if not rows or "chance" not in rows[0]:
            return False
        n = sum(int(r["n_queries"]) for r in rows if r["order"] == 0)
        return at_chance(self.spread(task, "label_accuracy")["mean"], float(rows[0]["chance"]), max(n, 1))

    def _reading(self, task: str) -> str:
        a, c = self.spread(task, "label_accuracy"), self.spread(task, "calibrated_accuracy")
        ld, cld = self.spread(task, "logit_diff"), self.spread(task, "calibrated_logit_diff")
        if self.at_chance(task):
            chance = next(r["chance"] for r in self.rows if r["task"] == task)
            return (f"{task} ({self.shots} demos, {self.n_sets} demo sets x {self.n_orders} orders): mean accuracy "
                    f"(argmax over the labels) {fmt(a['mean'])} is at chance ({fmt(chance)}, within 2 standard "
                    f"errors); its spread over orders (range {fmt(a['range'])}, sd {fmt(a['sd'])}) is spread around "
                    "chance, so neither the order sensitivity, the calibration nor the heads are read.")  # fmt: skip
        heads = ", ".join(f"{head_name(h)} (sd {sd:.2f}, mean |attribution| {m:.2f})"
                          for h, sd, m in self.top_heads(task))  # fmt: skip
        return (
            f"{task} ({self.shots} demos, {self.n_sets} demo sets x {self.n_orders} orders): mean accuracy (argmax "
            f"over the labels) {fmt(a['mean'])}; across orders of the same demos it spans {fmt(a['range'])} on "
            f"average (sd {fmt(a['sd'])}). With contextual calibration (content-free input "
            f"{self.content_free[task]!r}) the mean accuracy {change(a['mean'], c['mean'])} and the range "
            f"{change(a['range'], c['range'])}. The logit "
            f"difference's sd over orders {change(ld['sd'], cld['sd'])} with calibration (mean {fmt(ld['mean'])}). "
            f"Heads whose attribution moves most with order: {heads}."
        )

    def sections(self) -> list[Section]:
        acc, heads = self.figures()
        return [
            Section("Accuracy across demo orders", figure_html(acc), [self._reading(t) for t in self.tasks]),
            Section("Spread over orders (means over demo sets)", table_html(self.to_dataframe(), max_rows=100),
                    "range = max - min over the orders of one demo set; sd = standard deviation over those orders."),
            Section("Heads whose attribution moves with order", figure_html(heads),
                    "Direct logit attribution of each head to logit[answer] - logit[contrast], averaged over a demo "
                    "set's queries; the heatmap shows its standard deviation over orders (mean over sets)."),
        ]  # fmt: skip

    def findings(self) -> dict[str, Any]:
        task = self.tasks[0]
        c = self.spread(task, "calibrated_accuracy")
        (top, sd, _), *_ = self.top_heads(task, 1)
        a = self.spread(task, "label_accuracy")
        return {"task": task, "accuracy": a["mean"], "accuracy_range": a["range"], "accuracy_sd": a["sd"],
                "calibrated_accuracy": c["mean"], "calibrated_range": c["range"],
                "logit_diff_sd": self.spread(task, "logit_diff")["sd"],
                "top_head": None if self.at_chance(task) else head_name(top),
                "top_head_sd": sd, "at_chance": self.at_chance(task), "reading": self._reading(task)}  # fmt: skip


# ---------------------------------------------------------------- prompts


def fix_mapping(task: Task, rng: np.random.Generator) -> Task:
    """A fixture task whose rule shift or recorded map is drawn per prompt, with one drawn now (else ``task``)."""
    if isinstance(task, FixtureTask) and task.family == "rule" and task.shift is None:
        return replace(task, shift=int(rng.choice(task.cfg.train_shifts)))
    if isinstance(task, FixtureTask) and task.family == "recorded" and task.recorded is None:
        return replace(task, recorded=int(rng.integers(task.cfg.n_recorded)))
    return task


def demo_set_queries(checked: CheckedTask, task: Task, demos: Sequence[Pair], m: int,
                     rng: np.random.Generator) -> list[Pair]:  # fmt: skip
    """Up to ``m`` queries the demo set answers: inputs outside the demos with a fixed answer, else the demos."""
    inputs = {d.input for d in demos}
    pool = [p.input for p in task.pairs] if isinstance(task, PairTask) else list(corpus.LETTERS)
    cands = [x for x in pool if x not in inputs and task.lookup(x) in checked.answer_ids]
    if cands:
        pick = rng.choice(len(cands), size=min(m, len(cands)), replace=False)
        return [Pair(cands[int(i)], str(task.lookup(cands[int(i)]))) for i in pick]
    pick = rng.choice(len(demos), size=min(m, len(demos)), replace=False)
    return [demos[int(i)] for i in pick]


def orders(k: int, n_orders: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """The identity, then distinct permutations of ``range(k)``: all ``k!`` when ``k! <= n_orders``."""
    if math.factorial(k) <= n_orders:
        return list(itertools.permutations(range(k)))
    out = [tuple(range(k))]
    while len(out) < n_orders:
        p = tuple(int(i) for i in rng.permutation(k))
        if p not in out:
            out.append(p)
    return out


def content_free_input(model: Any, checked: CheckedTask) -> str:
    """``"N/A"`` for language models; a digit that is not a label for the fixture vocabulary."""
    if not uses_corpus_vocab(model):
        return "N/A"
    labels = set(checked.task.labels) | set(checked.answer_ids)
    for d in corpus.DIGITS:
        if d not in labels:
            return d
    raise TaskError(f"task {checked.task.name!r} uses every digit as a label; no content-free token is left")


# ---------------------------------------------------------------- the run


def _task_rows(model: Any, given: TaskArg, k: int, n_sets: int, n_orders: int, m: int, seed: int,
               batch_size: int) -> tuple[list[dict[str, Any]], torch.Tensor, torch.Tensor, str]:  # fmt: skip
    name = task_label(given)
    checked = check_task(model, get_task(given, model))
    checked.task.check_shots(k)
    cf = content_free_input(model, checked)
    rng, manip = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    ids, ans, con, cf_ids, index = [], [], [], [], []
    for s in range(n_sets):
        task = fix_mapping(checked.task, rng)
        demos = task.draw(rng, k).demos
        queries = demo_set_queries(checked, task, demos, m, rng)
        fixed_contrast = [render_prompt(model, FewShot(demos, q), checked)[3] for q in queries]
        for o, perm in enumerate(orders(k, n_orders, manip)):
            shown = tuple(demos[i] for i in perm)
            for q, c in zip(queries, fixed_contrast):
                _, toks, a, _ = render_prompt(model, FewShot(shown, q), checked)
                check_length(model, toks, name, k)
                ids.append(toks)
                ans.append(a)
                con.append(c)
                index.append((s, o))
            cf_ids.append(encode(model, checked.template.render(FewShot(shown, Pair(cf, "")))))
    answers, contrasts = torch.tensor(ans), torch.tensor(con)
    labels = torch.tensor(sorted(set(checked.answer_ids.values())))
    final = answer_logits(model, ids, batch_size=batch_size)
    logq = label_log_probs(final, labels)
    log_cf = label_log_probs(answer_logits(model, cf_ids, batch_size=batch_size), labels)  # [sets * orders, labels]
    dla = head_logit_attribution(model, ids, answers, contrasts, batch_size=batch_size)  # [N, L, H]
    col = {int(t): i for i, t in enumerate(labels)}
    a_col, c_col = torch.tensor([col[int(a)] for a in answers]), torch.tensor([col[int(c)] for c in contrasts])
    n_o = min(math.factorial(k), n_orders)  # orders per set, as orders() returns them
    cond = torch.tensor([s * n_o + o for s, o in index])
    cal = logq - log_cf[cond]
    ld = final.gather(1, answers[:, None])[:, 0] - final.gather(1, contrasts[:, None])[:, 0]
    per = {
        "accuracy": (final.argmax(-1) == answers).float(),
        "label_accuracy": (logq.argmax(-1) == a_col).float(),
        "calibrated_accuracy": (cal.argmax(-1) == a_col).float(),
        "logit_diff": ld,
        "calibrated_logit_diff": ld - (log_cf[cond, a_col] - log_cf[cond, c_col]),
    }
    rows = []
    n_cond = int(cond.max()) + 1
    head_mean = torch.zeros(n_cond, *dla.shape[1:], device=dla.device)
    for j in range(n_cond):
        sel = cond == j
        rows.append({"task": name, "set": j // n_o, "order": j % n_o, "n_queries": int(sel.sum()),
                     "chance": 1.0 / len(labels), **{key: float(v[sel].mean()) for key, v in per.items()}})  # fmt: skip
        head_mean[j] = dla[sel].mean(0)
    per_set = head_mean.reshape(n_sets, n_o, *dla.shape[1:])
    return rows, per_set.std(1, unbiased=False).mean(0), per_set.abs().mean((0, 1)), cf


def run_order(
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    shots: int | None = None,
    n_orders: int = 24,
    queries: int = 8,
    batch_size: int = 64,
    progress: bool = True,
) -> OrderSensitivity:
    """Order sensitivity of each task, raw and calibrated, and the heads whose attribution moves (module doc).

    ``n``: demo sets per task (default 8); ``shots``: demos per set (default 5 on the fixture
    vocabulary, 4 otherwise); ``queries``: queries per demo set.

    Raises:
        InputError: non-positive sizes; TaskError: unknown task or too many shots;
        PromptTooLongError: prompts longer than the context.
    """
    n_sets = run_default(model, "order", "n", n)
    k = run_default(model, "order", "shots", shots)
    check_positive(n=n_sets, n_orders=n_orders, queries=queries, shots=k)
    names = pick_tasks(model, tasks, FIXTURE_TASKS, min_shots=k + 1)
    rows: list[dict[str, Any]] = []
    sd, mabs, cf = {}, {}, {}
    for given in tqdm(names, desc="order", disable=not progress):
        name = task_label(given)
        r, sd[name], mabs[name], cf[name] = _task_rows(model, given, k, n_sets, n_orders, queries, seed, batch_size)
        rows += r
    n_o = min(math.factorial(k), n_orders)
    return OrderSensitivity(model_info(model).spec, seed, k, n_sets, n_o, cf, tuple(rows), sd, mabs)
