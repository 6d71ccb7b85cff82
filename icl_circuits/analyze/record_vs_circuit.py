"""``record-vs-circuit``: the observations side by side, on one page.

A pattern *recorded* in the weights and an *in-context circuit* predict different things: a record
needs no demos (or one, to say which record), ignores label noise and demo order, fails on labels and
rules it never stored, and does not need the heads that copy from context; an in-context circuit
needs demos, follows (or shrinks under) noisy ones, handles arbitrary symbol labels and unseen rules,
routes information through the label words (Wang et al.), and breaks when its induction heads are
ablated. This analysis runs ``order``, ``shots-and-noise``, ``unseen-task``, ``repetition``,
``label-binding`` and ``information-flow`` with their defaults (``n`` passed through) and puts each
one's headline numbers and reading in one table, with each analysis's main figure below. It draws
no verdict of its own: every sentence is the reading its analysis computed from its numbers.

Cost: the sum of the six analyses (a few minutes on ``fixture:icl-tiny`` with 2 CPU cores).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from icl_circuits.analyze.base import Analysis, AnalysisMixin, TaskArg, fmt
from icl_circuits.analyze.information_flow import run_information_flow
from icl_circuits.analyze.label_binding import LabelBinding, run_label_binding
from icl_circuits.analyze.order import run_order
from icl_circuits.analyze.repetition import run_repetition
from icl_circuits.analyze.shots_noise import run_shots_and_noise
from icl_circuits.analyze.unseen_task import run_unseen_task
from icl_circuits.errors import InputError
from icl_circuits.models import model_info
from icl_circuits.report import Section, table_html

#: (observation, run function, the headline measures shown in the table: finding key -> label)
PARTS: tuple[tuple[str, Callable[..., Analysis], dict[str, str]], ...] = (
    ("order", run_order, {
        "accuracy": "mean accuracy", "accuracy_range": "range over orders",
        "calibrated_range": "range, calibrated", "top_head": "head moving most"}),
    ("shots-and-noise", run_shots_and_noise, {
        "accuracy_0_shots": "accuracy, 0 shots", "accuracy_max_shots": "accuracy, most shots",
        "accuracy_half_noise": "accuracy, 50% labels flipped", "beta_half_noise": "shrink beta, 50% flipped"}),
    ("unseen-task", run_unseen_task, {
        "seen_accuracy_max_shots": "seen tasks, most shots", "unseen_accuracy_0_shots": "unseen, 0 shots",
        "unseen_accuracy_max_shots": "unseen, most shots", "top_unseen_head": "top head (unseen)"}),
    ("repetition", run_repetition, {
        "accuracy_r1": "accuracy, r = 1", "accuracy_max_r": "accuracy, largest r",
        "fw_norm_ratio_max_r": "|dW_lin| ratio", "demo_norm_ratio_max_r": "|c_D| ratio"}),
    ("label-binding", run_label_binding, {"induction_heads": "induction heads"}),
    ("information-flow", run_information_flow, {
        "share_S_wp_first_layer": "S_wp share, layer 0", "share_S_pq_last_layer": "S_pq share, last layer",
        "S_pq_exceeds_S_wp_from_layer": "S_pq > S_wp from layer"}),
)  # fmt: skip


def _show(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "n/a" if v is None else str(v).lower()
    return fmt(v) if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class RecordVsCircuit(AnalysisMixin):
    """The six analyses' results (``parts``, in :data:`PARTS` order)."""

    name: ClassVar[str] = "record-vs-circuit"
    title: ClassVar[str] = "Record or circuit? The observations side by side"
    model: str
    seed: int
    parts: tuple[Analysis, ...]

    def rows(self) -> list[dict[str, Any]]:
        """One row per observation: its headline measures (``label: value``) and its reading."""
        out = []
        for part, (_, _, keys) in zip(self.parts, PARTS):
            f = part.findings()
            chance = any(f.get(c) is True for c in ("at_chance", "unseen_at_chance"))  # a value left unread
            shown = {k: "not read (at chance)" if chance and f.get(k) is None else _show(f.get(k)) for k in keys}
            measures = "; ".join(f"{label}: {shown[k]}" for k, label in keys.items())
            if isinstance(part, LabelBinding):
                for labels in ("own", "symbols"):
                    accs = ", ".join(f"{r['task']} {_show(r['accuracy'])} ({_show(r['accuracy_ablated'])})"
                                     for r in part.rows if r["labels"] == labels)  # fmt: skip
                    measures += f"; {labels} labels, accuracy (induction heads ablated): {accs}"
            out.append({"observation": part.name, "measures": measures, "reading": f["reading"]})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": self.name, "model": self.model, "seed": self.seed, "summary": self.rows(),
                "parts": {p.name: p.to_dict() for p in self.parts}, "findings": self.findings()}  # fmt: skip

    def to_dataframe(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.rows())

    def figures(self) -> list[Any]:
        """The first figure of each analysis. Pure."""
        return [p.figures()[0] for p in self.parts]

    def sections(self) -> list[Section]:
        """The summary table, then every section of every part on this one page (one plotly.js bundle for all;
        the parts' own JSON files are written beside it, their pages are not)."""
        import html

        table = self.to_dataframe()[["observation", "measures"]]
        links = " | ".join(f'<a href="#{html.escape(p.name)}">{html.escape(p.name)}</a>' for p in self.parts)
        out = [Section("The observations", f"<p>Jump to: {links}</p>" + table_html(table, max_rows=len(table)),
                       "One row per observation with its headline numbers; below, each analysis in full: its "
                       "figures and its readings, computed from its numbers.")]  # fmt: skip
        for part in self.parts:
            for i, s in enumerate(part.sections()):
                out.append(Section(f"{part.name}: {s.title}", s.body, s.reading, anchor=part.name if i == 0 else ""))
        return out

    def markdown(self) -> str:
        """The summary as a Markdown table (observation | headline measures), e.g. for a README."""
        lines = ["| observation | measured |", "| --- | --- |"]
        escaped = "\\|"  # a literal pipe inside a Markdown table cell
        lines += [f"| `{r['observation']}` | {r['measures'].replace('|', escaped)} |" for r in self.rows()]
        return "\n".join(lines)

    def findings(self) -> dict[str, Any]:
        return {"reading": " ".join(f"[{r['observation']}] {r['reading']}" for r in self.rows())}


#: run-function parameters no part setting may replace (the run's own arguments)
FIXED_PARAMS = ("model", "seed", "progress")


def part_parameters(name: str) -> list[str]:
    """The keyword parameters of part ``name``'s run function that ``options`` may set (``n``, ``tasks``, sizes).

    Raises:
        InputError: ``name`` is not one of the six parts.
    """
    runs = {part: run for part, run, _ in PARTS}
    if name not in runs:
        raise InputError(f"record-vs-circuit has no part {name!r}; its parts: {', '.join(runs)}")
    return [p for p in inspect.signature(runs[name]).parameters if p not in FIXED_PARAMS]


def run_record_vs_circuit(
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    progress: bool = True,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> RecordVsCircuit:
    """Run the six analyses with their defaults (``n`` and ``tasks`` passed through) and collect them.

    ``options``: per part, keyword arguments of its run function that replace those defaults, e.g.
    ``{"order": {"n_orders": 4, "queries": 2}, "unseen-task": {"shots": (0, 2)}}`` (a quick run on a large model).

    Raises:
        InputError: an unknown part or a parameter its run function does not take; as each part raises.
    """
    given = dict(options or {})
    for part, kw in given.items():
        allowed = part_parameters(part)
        unknown = sorted(set(kw) - set(allowed))
        if unknown:
            raise InputError(f"record-vs-circuit part {part!r} takes no {', '.join(unknown)}; "
                             f"it takes {', '.join(allowed)}")  # fmt: skip
    parts = tuple(run(model, seed=seed, progress=progress, **{"n": n, "tasks": tasks, **given.get(name, {})})
                  for name, run, _ in PARTS)  # fmt: skip
    return RecordVsCircuit(model_info(model).spec, seed, parts)
