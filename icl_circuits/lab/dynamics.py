"""The circuit over training: head scores, in-context score and task accuracy at every checkpoint of a run.

At each checkpoint ``RUN_DIR/step-*`` (loaded with :func:`icl_circuits.load_model`), with the library's own
measures: :func:`icl_circuits.heads.scan.scan_heads` (no ablation) gives every head's induction,
previous-token and prefix-matching score on ``[BOS?, r, r]`` and Olsson et al.'s (2022) in-context score
``late - early`` (nats; negative = the model predicts the second copy from the first);
:func:`icl_circuits.tasks.scoring.evaluate` gives accuracy and logit difference of each corpus family:
``bound`` (in-context binding, 8 demos), ``bound-unseen`` (the same with labels A..Z 0..9, never labels in
training: binding that cannot be a record), ``recorded`` (in-weights record, 1 demo, maps drawn as in the
corpus), ``recorded-rare`` (the last, under a Zipf skew the rarest, recorded map), ``rule`` with trained
shifts and ``rule-heldout`` (shifts not in ``train_shifts``, 8 demos).

Events, computed from those numbers (never set):

* a head *becomes an induction head* at the first checkpoint where its induction score is
  ``>= threshold`` (default 0.4, :class:`icl_circuits.heads.scan.RoleThresholds`); likewise the first
  previous-token head;
* the *in-context-score drop* is the first checkpoint where the score has fallen by half of its total
  fall (from the untrained checkpoint to its minimum), provided the fall is at least ``min_drop`` nats;
* threshold-free: the checkpoint interval where the best induction score rises fastest, and the one where the
  in-context score falls fastest (:func:`steepest_step`).

Cost: one model load and one scan per checkpoint, plus ``8 * n`` prompts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icl_circuits.errors import InputError
from icl_circuits.io import atomic_write_json, versions
from icl_circuits.lab.train import kind_colors, list_checkpoints, loss_figure, read_log, read_run_config
from icl_circuits.results import Result, series_colors

SCORES = ("induction", "previous_token", "prefix_matching")


def first_at_or_above(steps: list[int], values: list[float], threshold: float) -> int | None:
    """The first step whose value is ``>= threshold`` (None when none is)."""
    return next((s for s, v in zip(steps, values) if v >= threshold), None)


def drop_step(steps: list[int], values: list[float], min_drop: float) -> int | None:
    """The first step where ``values`` has fallen by half its total fall ``values[0] - min(values)``;
    None when that fall is below ``min_drop``."""
    fall = values[0] - min(values)
    if fall < min_drop:
        return None
    return next(s for s, v in zip(steps, values) if v <= values[0] - fall / 2)


def steepest_step(steps: list[int], values: list[float], *, rising: bool) -> int | None:
    """The end step of the checkpoint interval where ``values`` rose (``rising``) or fell fastest per step
    (a threshold-free event); None with fewer than two checkpoints."""
    if len(steps) < 2:
        return None
    sign = 1.0 if rising else -1.0
    rates = [sign * (v1 - v0) / (s1 - s0) for s0, s1, v0, v1 in zip(steps, steps[1:], values, values[1:])]
    return steps[1 + max(range(len(rates)), key=lambda i: rates[i])]


@dataclass(frozen=True)
class Dynamics(Result):
    """Measurements at each checkpoint of one run, and the events read from them."""

    run_dir: str
    steps: tuple[int, ...]
    heads: dict[str, list[list[list[float]]]]  # score -> [checkpoint][layer][head]
    in_context_score: tuple[float, ...]
    families: dict[str, dict[str, list[float]]]  # family -> {"accuracy": [...], "logit_diff": [...]}
    threshold: float
    min_drop: float
    settings: dict[str, Any] = field(default_factory=dict)
    log: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    @property
    def n_layers(self) -> int:
        return len(self.heads["induction"][0])

    @property
    def n_heads(self) -> int:
        return len(self.heads["induction"][0][0])

    def head_series(self, score: str, layer: int, head: int) -> list[float]:
        return [c[layer][head] for c in self.heads[score]]

    def formation_steps(self, score: str = "induction") -> dict[str, int | None]:
        """``"L1H2" -> `` the first step each head's ``score`` reaches the threshold (None: never)."""
        return {f"L{l}H{h}": first_at_or_above(list(self.steps), self.head_series(score, l, h), self.threshold)
                for l in range(self.n_layers) for h in range(self.n_heads)}  # fmt: skip

    def first_head(self, score: str) -> tuple[str | None, int | None]:
        formed = {k: v for k, v in self.formation_steps(score).items() if v is not None}
        if not formed:
            return None, None
        name = min(formed, key=lambda k: (formed[k], k))
        return name, formed[name]

    @property
    def ics_drop_step(self) -> int | None:
        return drop_step(list(self.steps), list(self.in_context_score), self.min_drop)

    def events(self) -> dict[str, Any]:
        """The numbers the reading is made of."""
        ind_head, ind_step = self.first_head("induction")
        prev_head, prev_step = self.first_head("previous_token")
        drop = self.ics_drop_step
        gap = None if ind_step is None or drop is None else ind_step - drop
        interval = max(b - a for a, b in zip(self.steps, self.steps[1:])) if len(self.steps) > 1 else None
        best = [max(max(r) for r in c) for c in self.heads["induction"]]
        return {
            "induction_head": ind_head, "induction_step": ind_step,
            "previous_token_head": prev_head, "previous_token_step": prev_step,
            "ics_drop_step": drop, "ics_start": self.in_context_score[0], "ics_min": min(self.in_context_score),
            "ics_final": self.in_context_score[-1], "gap_steps": gap, "checkpoint_interval": interval,
            "induction_steepest_step": steepest_step(list(self.steps), best, rising=True),
            "ics_steepest_step": steepest_step(list(self.steps), list(self.in_context_score), rising=False),
            "untrained_max_induction": max(max(r) for r in self.heads["induction"][0]),
            "final_max_induction": max(max(r) for r in self.heads["induction"][-1]),
            "final_accuracy": {f: v["accuracy"][-1] for f, v in self.families.items()},
            "max_accuracy": {f: max(v["accuracy"]) for f, v in self.families.items()},
        }  # fmt: skip

    def reading(self) -> str:
        """A plain reading computed from :meth:`events`."""
        e = self.events()
        parts = []
        if e["induction_step"] is None:
            parts.append(f"No head reached induction score {self.threshold} (final max "
                         f"{e['final_max_induction']:.2f}).")  # fmt: skip
        else:
            parts.append(f"{e['induction_head']} became an induction head (score >= {self.threshold}) at step "
                         f"{e['induction_step']}; the untrained checkpoint's best induction score was "
                         f"{e['untrained_max_induction']:.2f}.")  # fmt: skip
        if e["ics_drop_step"] is None:
            parts.append(f"The in-context score fell by less than {self.min_drop} nats "
                         f"({e['ics_start']:.2f} -> min {e['ics_min']:.2f}): no drop.")  # fmt: skip
        else:
            parts.append(f"The in-context score dropped (half its fall, {e['ics_start']:.2f} -> min "
                         f"{e['ics_min']:.2f} nats) at step {e['ics_drop_step']}.")  # fmt: skip
        if e["gap_steps"] is not None:
            g, iv = e["gap_steps"], e["checkpoint_interval"]
            same = "they coincide within one checkpoint interval" if abs(g) <= iv else "they do not coincide"
            parts.append(f"Induction formation minus drop: {g:+d} steps ({same}; checkpoints every {iv} steps).")
        if e["induction_steepest_step"] is not None:
            parts.append(f"Threshold-free: the best induction score rose fastest in the checkpoint interval ending "
                         f"at step {e['induction_steepest_step']}, the in-context score fell fastest in the one "
                         f"ending at step {e['ics_steepest_step']}.")  # fmt: skip
        if e["previous_token_step"] is not None and e["induction_step"] is not None:
            order = ("before" if e["previous_token_step"] < e["induction_step"] else
                     "at the same checkpoint as" if e["previous_token_step"] == e["induction_step"] else "after")
            parts.append(f"The first previous-token head ({e['previous_token_head']}, step "
                         f"{e['previous_token_step']}) formed {order} the first induction head.")  # fmt: skip
        acc = ", ".join(f"{f} {v:.2f} (max {e['max_accuracy'][f]:.2f})" for f, v in e["final_accuracy"].items())
        parts.append(f"Final accuracy: {acc}.")
        return " ".join(parts)

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        """One row per checkpoint: step, in-context score, the best head of each score, family accuracies."""
        import pandas as pd

        rows = []
        for i, s in enumerate(self.steps):
            row: dict[str, Any] = {"step": s, "in_context_score": self.in_context_score[i]}
            for score in SCORES:
                row[f"max_{score}"] = max(max(r) for r in self.heads[score][i])
            for f, v in self.families.items():
                row[f"acc_{f}"] = v["accuracy"][i]
                row[f"logit_diff_{f}"] = v["logit_diff"][i]
            rows.append(row)
        return pd.DataFrame(rows)

    def figures(self) -> list[Any]:
        """The panels of :meth:`figure_dict`, in order."""
        return list(self.figure_dict().values())

    def findings(self) -> dict[str, Any]:
        flat = {k: v for k, v in self.events().items() if not isinstance(v, dict)}
        return {**flat, "reading": self.reading()}

    def figure_dict(self) -> dict[str, Any]:
        """Figures (pure): head scores per head, in-context score, accuracy per family, training loss."""
        import plotly.graph_objects as go

        e = self.events()
        figs: dict[str, Any] = {}
        for score in ("induction", "previous_token"):
            fig = go.Figure()
            colors = series_colors([f"L{l}H{h}" for l in range(self.n_layers) for h in range(self.n_heads)])
            for l in range(self.n_layers):
                for h in range(self.n_heads):
                    c = colors[f"L{l}H{h}"]
                    fig.add_trace(go.Scatter(x=list(self.steps), y=self.head_series(score, l, h), mode="lines+markers",
                                             name=f"L{l}H{h}", line={"color": c}, marker={"color": c}))  # fmt: skip
            fig.add_hline(y=self.threshold, line_dash="dot")
            fig.update_layout(title=f"{score} score per head", xaxis_title="step", yaxis_title=score,
                              yaxis_range=[0, 1.02])  # fmt: skip
            figs[score] = fig
        c0 = series_colors(["in-context score"])["in-context score"]
        fig = go.Figure(go.Scatter(x=list(self.steps), y=list(self.in_context_score), mode="lines+markers",
                                   name="in-context score", line={"color": c0}, marker={"color": c0}))  # fmt: skip
        for key, label in (("induction_step", "induction head"), ("ics_drop_step", "drop")):
            if e[key] is not None:
                fig.add_vline(x=e[key], line_dash="dash", annotation_text=f"{label} @ {e[key]}")
        fig.update_layout(title="in-context score (loss late - early, nats)", xaxis_title="step",
                          yaxis_title="nats")  # fmt: skip
        figs["in_context_score"] = fig
        fig = go.Figure()
        fam = kind_colors(*self.families)
        for f, v in self.families.items():
            fig.add_trace(go.Scatter(x=list(self.steps), y=v["accuracy"], mode="lines+markers", name=f,
                                     line={"color": fam[f]}, marker={"color": fam[f]}))  # fmt: skip
        fig.update_layout(title="accuracy per family", xaxis_title="step", yaxis_title="accuracy",
                          yaxis_range=[0, 1.02])  # fmt: skip
        figs["accuracy"] = fig
        if self.log:
            import pandas as pd

            rows = [{"step": r["step"], "loss": r["loss"], **{f"loss_{k}": v for k, v in r["loss_by_kind"].items()}}
                    for r in self.log]  # fmt: skip
            figs["loss"] = loss_figure(pd.DataFrame(rows))
        return figs

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": self.run_dir, "steps": list(self.steps), "heads": self.heads,
            "in_context_score": list(self.in_context_score), "families": self.families,
            "threshold": self.threshold, "min_drop": self.min_drop, "settings": self.settings,
            "formation_steps": {s: self.formation_steps(s) for s in ("induction", "previous_token")},
            "events": self.events(), "reading": self.reading(),
        }  # fmt: skip



def heldout_shifts(train_shifts: tuple[int, ...], k: int = 3) -> tuple[int, ...]:
    """The ``k`` smallest shifts in 1..25 that training never used."""
    return tuple(s for s in range(1, 26) if s not in train_shifts)[:k]


def measure_checkpoint(
    model: Any, cfg: Any, *, n: int, seed: int, seq_len: int, heldout: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Head scores ``[layer][head]``, in-context score and family accuracy / logit difference of one model.

    ``heldout``: the shifts of ``rule-heldout`` (default :func:`heldout_shifts` of the trained ones).
    """
    from icl_circuits.heads.scan import scan_heads
    from icl_circuits.tasks.registry import DEFAULT_SYMBOLS, FixtureTask, SubstitutedTask
    from icl_circuits.tasks.scoring import evaluate

    scan = scan_heads(model, seq_len=seq_len, batch=16, seed=seed, ablation=False, progress=False)
    out: dict[str, Any] = {"heads": {s: scan.scores[s].tolist() for s in SCORES},
                           "in_context_score": scan.in_context_score, "families": {}}  # fmt: skip
    heldout = heldout_shifts(tuple(cfg.train_shifts)) if heldout is None else heldout
    if set(heldout) & set(cfg.train_shifts) or not heldout:
        raise InputError(f"held-out shifts {list(heldout)} must be non-empty and not among the trained "
                         f"{list(cfg.train_shifts)}")  # fmt: skip
    bound = FixtureTask("bound", cfg)
    tasks: dict[str, list[tuple[Any, int]]] = {
        "bound": [(bound, 8)],
        "bound-unseen": [(SubstitutedTask(bound, DEFAULT_SYMBOLS, name="fixture-bound-unseen"), 8)],
        "recorded": [(FixtureTask("recorded", cfg), 1)],
        "recorded-rare": [(FixtureTask("recorded", cfg, recorded=cfg.n_recorded - 1), 1)],
        "rule": [(FixtureTask("rule", cfg), 8)],
        "rule-heldout": [(FixtureTask("rule", cfg, shift=s), 8) for s in heldout],
    }
    for fam, items in tasks.items():
        rows = [evaluate(model, t, [k], n=n, seed=seed).rows[0] for t, k in items]
        out["families"][fam] = {"accuracy": sum(r["accuracy"] for r in rows) / len(rows),
                                "logit_diff": sum(r["logit_diff"] for r in rows) / len(rows)}  # fmt: skip
    return out


def run_dynamics(
    run_dir: str | os.PathLike[str],
    *,
    n: int = 64,
    seed: int = 0,
    seq_len: int = 20,
    threshold: float = 0.4,
    min_drop: float = 0.3,
    heldout: tuple[int, ...] | None = None,
    progress: bool = True,
) -> Dynamics:
    """Measure every complete checkpoint of the run in ``run_dir`` (see the module docstring).

    Raises:
        InputError: ``run_dir`` is not a training run, or has no checkpoint; ``heldout`` has a trained shift.
    """
    from tqdm.auto import tqdm

    from icl_circuits.models import load_model

    cfg = read_run_config(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise InputError(f"{str(run_dir)!r} has no complete checkpoint to measure")
    heldout = heldout_shifts(tuple(cfg.corpus.train_shifts)) if heldout is None else tuple(heldout)
    measured = []
    for _, folder in tqdm(ckpts, desc="checkpoints", disable=not progress):
        model = load_model(str(folder), device="cpu")
        measured.append(measure_checkpoint(model, cfg.corpus, n=n, seed=seed, seq_len=seq_len, heldout=heldout))
    families = {f: {k: [m["families"][f][k] for m in measured] for k in ("accuracy", "logit_diff")}
                for f in measured[0]["families"]}  # fmt: skip
    settings = {"n": n, "seed": seed, "seq_len": seq_len, "config": cfg.to_dict(), "versions": versions(),
                "heldout_shifts": list(heldout)}  # fmt: skip
    return Dynamics(
        str(run_dir), tuple(s for s, _ in ckpts), {s: [m["heads"][s] for m in measured] for s in SCORES},
        tuple(m["in_context_score"] for m in measured), families, threshold, min_drop, settings,
        tuple(read_log(run_dir)),
    )  # fmt: skip


def write_dynamics(dyn: Dynamics, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``out/dynamics.json`` and the offline report ``out/dynamics.html`` (curves, formation table, reading)."""
    import pandas as pd

    from icl_circuits.report import Section, figure_html, table_html, write_report

    out = Path(out)
    json_path = atomic_write_json(out / "dynamics.json", dyn.to_dict())
    figs = dyn.figure_dict()
    form = pd.DataFrame({"head": list(dyn.formation_steps("induction")),
                         "induction from step": list(dyn.formation_steps("induction").values()),
                         "previous-token from step": list(dyn.formation_steps("previous_token").values())})  # fmt: skip
    sections = [
        Section("Reading", table_html(pd.DataFrame([dyn.events()]).drop(columns=["final_accuracy", "max_accuracy"])),
                dyn.reading()),
        Section("In-context score", figure_html(figs["in_context_score"])),
        Section("Induction score per head", figure_html(figs["induction"])),
        Section("Previous-token score per head", figure_html(figs["previous_token"])),
        Section("When each head forms", table_html(form, max_rows=200)),
        Section("Accuracy per family", figure_html(figs["accuracy"])),
        Section("Per checkpoint", table_html(dyn.to_dataframe(), max_rows=500)),
    ]
    if "loss" in figs:
        sections.append(Section("Training loss per kind of sequence", figure_html(figs["loss"])))
    html_path = write_report(out / "dynamics.html", f"Training dynamics of {dyn.run_dir}", sections,
                             {"settings": dyn.settings})  # fmt: skip
    return json_path, html_path
