"""``label-binding``: recorded vs bound vs rule tasks, with their labels as trained and as arbitrary symbols,
and which of them need the induction heads.

**Conditions.** Each task is run twice with ``k`` demos: with its own labels, and with its labels
replaced, afresh for every prompt, by distinct upper-case symbols ``A..Z`` and the query drawn
among the demos (``build_prompts(..., substitute=UPPER)``; :class:`~icl_circuits.tasks.registry.SubstitutedTask`):
the "A -> B, C -> D, A -> ?" probe, which only binding in context can solve (upper-case letters are
never labels in the fixture corpus). On the fixture vocabulary the tasks are ``fixture-recorded``
(a permutation stored in the weights; the query is not among the demos), ``fixture-bound`` (a fresh
binding; the query is among the demos) and ``fixture-rule`` (shift-by-s; the query is not among the
demos); for other models ``country-capital`` and ``antonym``.

**Induction-head ablation.** The heads :func:`icl_circuits.heads.scan.scan_heads` classifies as
induction heads (its :class:`~icl_circuits.heads.scan.RoleThresholds`) are mean-ablated together on
``hook_z`` (:mod:`icl_circuits.patching.ablation`; means over the same condition's prompts). Control:
as many heads drawn at random among the others (``n_controls`` draws, seeded, averaged).

**Dependence.** A condition *depends on the circuit* when removing the induction heads takes away at
least half of its accuracy above chance, ``(acc - acc_ablated) / (acc - chance) >= 0.5``, and more
than the control heads take, ``acc - acc_ablated > acc - acc_control``. The criterion is applied to
the numbers; the reading lists which conditions meet it.

Cost: the head scan (two forwards, plus one per head with ``scan_ablation``), then per condition one
forward for the means and ``2 + n_controls`` forwards of ``n`` prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from icl_circuits.analyze.base import AnalysisMixin, TaskArg, check_positive, fmt, head_name, pick_tasks, task_label
from icl_circuits.models import model_info
from icl_circuits.patching.ablation import ablated_logits, mean_z
from icl_circuits.report import Section, figure_html, table_html
from icl_circuits.shapes import all_heads, check_model_heads
from icl_circuits.tasks import corpus
from icl_circuits.tasks.defaults import run_default
from icl_circuits.tasks.prompts import build_prompts, check_task
from icl_circuits.tasks.registry import get_task
from icl_circuits.tasks.scoring import answer_logits, scores_from_logits

FIXTURE_TASKS = ("fixture-recorded", "fixture-bound", "fixture-rule")
SYMBOLS: tuple[str, ...] = corpus.UPPER
MIN_MARGIN = 0.1  # clean accuracy must exceed chance by this much for the dependence criterion to apply


@dataclass(frozen=True)
class LabelBinding(AnalysisMixin):
    """``rows``: one per (task, labels) with clean / induction-ablated / control accuracy and logit
    difference (``None`` where no induction head was found); ``induction_heads``: the ablated heads."""

    name: ClassVar[str] = "label-binding"
    title: ClassVar[str] = "Label binding: recorded, bound and rule tasks, and the induction heads"
    model: str
    seed: int
    n: int
    shots: int
    induction_heads: tuple[tuple[int, int], ...]
    heads_source: str
    n_controls: int
    rows: tuple[dict[str, Any], ...]

    def depends(self, row: dict[str, Any]) -> bool | None:
        """The module doc's criterion; ``None`` without induction heads or with clean accuracy within
        :data:`MIN_MARGIN` of chance (nothing to lose)."""
        if row["accuracy_ablated"] is None or row["accuracy"] - row["chance"] < MIN_MARGIN:
            return None
        margin = row["accuracy"] - row["chance"]
        drop = row["accuracy"] - row["accuracy_ablated"]
        control = 0.0 if row["accuracy_control"] is None else row["accuracy"] - row["accuracy_control"]
        return bool(margin > 0 and drop / margin >= 0.5 and drop > control)

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": self.name, "model": self.model, "seed": self.seed, "n": self.n, "shots": self.shots,
                "induction_heads": [list(h) for h in self.induction_heads], "heads_source": self.heads_source,
                "n_controls": self.n_controls,
                "rows": [{**r, "depends_on_induction_heads": self.depends(r)} for r in self.rows],
                "findings": self.findings()}  # fmt: skip

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame([{**r, "depends_on_induction_heads": self.depends(r)} for r in self.rows])

    def figures(self) -> list[Any]:
        """[accuracy per condition: clean, induction heads ablated, control heads ablated]. Pure."""
        import plotly.graph_objects as go

        x = [f"{r['task']} ({r['labels']})" for r in self.rows]
        fig = go.Figure()
        for key, name in (("accuracy", "clean"), ("accuracy_ablated", "induction heads ablated"),
                          ("accuracy_control", "as many other heads ablated")):  # fmt: skip
            fig.add_trace(go.Bar(name=name, x=x, y=[r[key] for r in self.rows]))
        fig.add_trace(go.Scatter(x=x, y=[r["chance"] for r in self.rows], mode="markers", name="chance",
                                 marker={"symbol": "line-ew-open", "size": 30}))  # fmt: skip
        heads = ", ".join(head_name(h) for h in self.induction_heads) or "none found"
        fig.update_layout(barmode="group", yaxis_title="accuracy", yaxis_range=[0, 1.05],
                          title=f"{self.shots} demos, n={self.n}; induction heads: {heads}")  # fmt: skip
        return [fig]

    def reading(self) -> str:
        """The reading as one string (:meth:`paragraphs` joined)."""
        return " ".join(self.paragraphs())

    def paragraphs(self) -> list[str]:
        """The reading, split: the accuracies, one paragraph per task with its ablation, then the verdict."""
        def accs(labels: str, key: str) -> str:
            return ", ".join(f"{r['task']} {fmt(r[key])}" for r in self.rows if r["labels"] == labels)

        text = (f"Accuracy with {self.shots} demos, labels as trained: {accs('own', 'accuracy')}; with upper-case "
                f"symbol labels bound in context (query among the demos): {accs('symbols', 'accuracy')}.")  # fmt: skip
        if not self.induction_heads:
            return [text + f" The head scan found no induction head ({self.heads_source}), so nothing was ablated."]
        heads = ", ".join(head_name(h) for h in self.induction_heads)
        who = "the given heads" if self.heads_source == "given" else "the induction heads"
        out = [text + f" Mean-ablating {who} {heads} ({self.heads_source}), accuracy clean -> ablated (control):"]
        for task in dict.fromkeys(r["task"] for r in self.rows):
            out.append(f"{task}: " + "; ".join(
                f"{r['labels']} labels {fmt(r['accuracy'])} -> {fmt(r['accuracy_ablated'])} (control "
                f"{fmt(r['accuracy_control'])})" for r in self.rows if r["task"] == task) + ".")  # fmt: skip
        dep = [f"{r['task']} ({r['labels']})" for r in self.rows if self.depends(r)]
        indep = [f"{r['task']} ({r['labels']})" for r in self.rows if self.depends(r) is False]
        near = [f"{r['task']} ({r['labels']})" for r in self.rows if self.depends(r) is None]
        out.append(f"By the criterion (at least half the accuracy above chance lost, and more than with "
                   f"{len(self.induction_heads)} other heads), these depend on them: {', '.join(dep) or 'none'}; "
                   f"these do not: {', '.join(indep) or 'none'}"
                   + (f"; too close to chance to tell: {', '.join(near)}." if near else "."))  # fmt: skip
        return out

    def sections(self) -> list[Section]:
        (fig,) = self.figures()
        return [
            Section("Accuracy by task and labels, with the induction heads ablated", figure_html(fig),
                    self.paragraphs()),
            Section("Numbers", table_html(self.to_dataframe(), max_rows=50),
                    "logit_diff = logit[answer] - logit[contrast]; *_ablated: induction heads mean-ablated; "
                    f"*_control: the mean over {self.n_controls} draws of as many other heads."),
        ]  # fmt: skip

    def findings(self) -> dict[str, Any]:
        out: dict[str, Any] = {"induction_heads": ", ".join(head_name(h) for h in self.induction_heads) or "none"}
        for r in self.rows:
            key = f"{r['task']}:{r['labels']}"
            out[f"{key}:accuracy"] = r["accuracy"]
            out[f"{key}:accuracy_ablated"] = r["accuracy_ablated"]
            out[f"{key}:depends"] = self.depends(r)
        out["reading"] = self.reading()
        return out


def find_induction_heads(model: Any, seed: int, *, ablation: bool = True) -> tuple[list[tuple[int, int]], str]:
    """The head scan's induction heads (strongest first) and a note of how they were found."""
    from icl_circuits.heads.scan import scan_heads

    seq_len = min(20, (int(model.cfg.n_ctx) - 1) // 2)
    scan = scan_heads(model, seq_len=seq_len, batch=16, seed=seed, ablation=ablation, progress=False)
    note = f"head scan, seq_len {seq_len}, induction score >= {scan.thresholds.induction}" + (
        "" if ablation else ", without the ablation sweep (copying score as the evidence of acting)")
    return list(scan.induction_heads), note


def run_label_binding(
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    shots: int | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    n_controls: int = 3,
    scan_ablation: bool | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> LabelBinding:
    """Accuracy of each task with its own and with symbol labels, clean and with the induction heads
    mean-ablated (module doc). ``heads``: ablate these instead of the head scan's induction heads.

    Defaults: ``n = 64`` prompts per condition, ``shots = 6`` (fixture vocabulary) or 4; ``scan_ablation``
    (the head scan's ablation sweep) on fixtures, off on language models (``tasks.defaults``).

    Raises:
        InputError: bad sizes or heads; TaskError: unknown task.
    """
    n = run_default(model, "label-binding", "n", n)
    k = run_default(model, "label-binding", "shots", shots)
    scan_ablation = bool(run_default(model, "label-binding", "scan_ablation", scan_ablation))
    check_positive(n=n, shots=k)
    names = pick_tasks(model, tasks, FIXTURE_TASKS, min_shots=k)
    if heads is None:
        chosen, source = find_induction_heads(model, seed, ablation=scan_ablation)
    else:
        chosen, source = check_model_heads(model, heads), "given"
    others = [lh for lh in all_heads(model) if lh not in chosen]
    gen = torch.Generator().manual_seed(seed)
    controls = [[others[int(i)] for i in torch.randperm(len(others), generator=gen)[: len(chosen)]]
                for _ in range(n_controls)] if chosen and len(others) >= len(chosen) else []  # fmt: skip
    rows = []
    jobs = [(given, labels) for given in names for labels in ("own", "symbols")]
    for given, labels in tqdm(jobs, desc="label-binding", disable=not progress):
        name = task_label(given)
        task = get_task(given, model)
        checked = check_task(model, task)
        if labels == "own":
            ps = build_prompts(model, checked, k, n, seed)
            chance = 1.0 / len(checked.task.labels)
        else:
            ps = build_prompts(model, task, k, n, seed, substitute=list(SYMBOLS))
            chance = 1.0 / len(SYMBOLS)
        ans, con = ps.answer_ids, ps.contrast_ids
        clean = scores_from_logits(answer_logits(model, ps.tokens, batch_size=batch_size), ans, con)
        row: dict[str, Any] = {"task": name, "labels": labels, "shots": k, "n": n, "chance": chance,
                               "accuracy": clean.accuracy, "logit_diff": float(clean.logit_diff.mean())}  # fmt: skip
        row.update(accuracy_ablated=None, logit_diff_ablated=None, accuracy_control=None, logit_diff_control=None)
        if chosen:
            means = mean_z(model, ps.tokens, batch_size=batch_size)
            abl = scores_from_logits(ablated_logits(model, ps.tokens, chosen, means=means, batch_size=batch_size),
                                     ans, con)  # fmt: skip
            ctl = [scores_from_logits(ablated_logits(model, ps.tokens, c, means=means, batch_size=batch_size), ans, con)
                   for c in controls]  # fmt: skip
            row.update(accuracy_ablated=abl.accuracy, logit_diff_ablated=float(abl.logit_diff.mean()))
            if ctl:
                row.update(accuracy_control=sum(s.accuracy for s in ctl) / len(ctl),
                           logit_diff_control=sum(float(s.logit_diff.mean()) for s in ctl) / len(ctl))  # fmt: skip
        rows.append(row)
    return LabelBinding(model_info(model).spec, seed, n, k, tuple(chosen), source, len(controls), tuple(rows))
