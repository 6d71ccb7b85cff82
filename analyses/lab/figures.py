"""The README figures and tables of the training-lab experiments, from their outputs (``dynamics.json``).

    python -m analyses.lab.figures --phase-change out/lab/phase_change \\
        --record-vs-circuit out/lab/record_vs_circuit --task-diversity out/lab/task_diversity

``--phase-change`` is a run folder (``icl-circuits train`` + ``dynamics``); the others are ``icl-circuits sweep``
output folders (``results.csv``, ``cells/<cell_id>/dynamics.json``). Writes
``analyses/lab/figures/{phase_change,record_vs_circuit,task_diversity}.svg`` (small, self-made SVG) and prints
one Markdown table per experiment. Every number is read from the runs; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from analyses.lab import svg
from icl_circuits.io import atomic_write_text
from icl_circuits.lab.dynamics import steepest_step
from icl_circuits.lab.sweep import CELLS_DIR, MARKER, RESULTS_FILE
from icl_circuits.tasks.corpus import LETTERS

FIGURES = Path(__file__).resolve().parent / "figures"
CHANCE = 1 / len(LETTERS)


def read_cells(sweep_out: str | Path) -> list[dict[str, Any]]:
    """Each finished cell of a sweep, in the table's order: ``cell`` (its id), ``overrides`` (its grid values,
    from the cell's ``cell.json``), ``seed`` and its ``dynamics.json``. Cells not ``ok`` in ``results.csv`` are
    left out (and named on stderr)."""
    import pandas as pd

    root = Path(sweep_out)
    out, missing = [], []
    for row in pd.read_csv(root / RESULTS_FILE).to_dict("records"):
        folder = root / CELLS_DIR / row["cell_id"]
        if row["status"] != "ok" or not (folder / "dynamics.json").is_file():
            missing.append(f"{row['cell_id']} ({row['status']})")
            continue
        params = dict(json.loads((folder / MARKER).read_text())["params"])
        seed = params.pop("seed")
        out.append({"cell": row["cell_id"], "overrides": params, "seed": seed,
                    "dynamics": json.loads((folder / "dynamics.json").read_text())})  # fmt: skip
    if missing:
        print(f"{root}: left out, not finished: {', '.join(missing)}", file=sys.stderr)
    return out


def table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows])


def phase_change(run_dir: str | Path) -> tuple[str, str]:
    """In-context score and every head's induction score over the checkpoints, with the two events marked."""
    d = json.loads((Path(run_dir) / "dynamics.json").read_text())
    steps, ev = d["steps"], dict(d["events"])
    best = [max(max(r) for r in c) for c in d["heads"]["induction"]]  # events of an older dynamics.json
    ev.setdefault("induction_steepest_step", steepest_step(steps, best, rising=True))
    ev.setdefault("ics_steepest_step", steepest_step(steps, d["in_context_score"], rising=False))
    events = (("ics_drop_step", "drop"), ("induction_step", "induction head"))
    marks = [(ev[k], f"{label} @ {ev[k]}") for k, label in events if ev[k] is not None]
    ics = svg.line_chart({"in-context score": (steps, d["in_context_score"])}, title="in-context score (late - early)",
                         xlabel="step", ylabel="nats", ymin=min(d["in_context_score"]) - 0.2,
                         ymax=max(d["in_context_score"]) + 0.2, vlines=marks)  # fmt: skip
    ind = d["heads"]["induction"]
    heads = {f"L{l}H{h}": (steps, [c[l][h] for c in ind]) for l in range(len(ind[0])) for h in range(len(ind[0][0]))}
    ind_fig = svg.line_chart(heads, title="induction score per head", xlabel="step", ylabel="induction score",
                             ymin=0.0, ymax=1.0, vlines=marks, hlines=[d["threshold"]])  # fmt: skip
    rows = [[k, ev[k]] for k in ("ics_start", "ics_min", "ics_drop_step", "induction_head", "induction_step",
                                 "gap_steps", "checkpoint_interval", "induction_steepest_step",
                                 "ics_steepest_step", "untrained_max_induction",
                                 "final_max_induction", "previous_token_step")]  # fmt: skip
    return svg.page([ics, ind_fig]), table(["event", "value"], rows) + "\n\n" + d["reading"]


def _label(cell: dict[str, Any]) -> str:
    o = cell["overrides"]
    parts = []
    if "corpus.family_shares" in o:
        parts.append(f"bound {o['corpus.family_shares'][1]:g}")
    if "corpus.zipf_exponent" in o:
        parts.append(f"zipf {o['corpus.zipf_exponent']:g}")
    if "corpus.train_shifts" in o:
        parts.append(f"{len(o['corpus.train_shifts'])} shifts")
    return ", ".join(parts) or cell["cell"]


def record_vs_circuit(sweep_out: str | Path) -> tuple[str, str]:
    """Final and best (over training) accuracy of the in-context and in-weights families, per cell."""
    cells = read_cells(sweep_out)
    fams = ["bound", "bound-unseen", "recorded", "recorded-rare"]
    groups = [_label(c) for c in cells]
    charts = []
    for what, key in (("final", "final_accuracy"), ("best over training", "max_accuracy")):
        series = {f: [c["dynamics"]["events"][key][f] for c in cells] for f in fams}
        charts.append(svg.bar_chart(groups, series, title=f"accuracy, {what} (dotted: chance 1/26)",
                                    xlabel="share of bound sequences among few-shot ones, Zipf exponent",
                                    ylabel="accuracy", hlines=[CHANCE]))  # fmt: skip
    rows = [[_label(c), *[c["dynamics"]["events"]["final_accuracy"][f] for f in fams],
             *[c["dynamics"]["events"]["max_accuracy"][f] for f in fams],
             c["dynamics"]["events"]["final_max_induction"]] for c in cells]  # fmt: skip
    header = ["cell", *[f"{f} final" for f in fams], *[f"{f} best" for f in fams], "max induction"]
    return svg.page(charts), table(header, rows)


def task_diversity(sweep_out: str | Path) -> tuple[str, str]:
    """Accuracy on trained and on the (fixed) held-out shifts against the number of trained shifts."""
    cells = sorted(read_cells(sweep_out), key=lambda c: len(c["overrides"]["corpus.train_shifts"]))
    n = [len(c["overrides"]["corpus.train_shifts"]) for c in cells]
    ev = [c["dynamics"]["events"] for c in cells]
    series = {"rule (trained) final": (n, [e["final_accuracy"]["rule"] for e in ev]),
              "rule (trained) best": (n, [e["max_accuracy"]["rule"] for e in ev]),
              "held-out final": (n, [e["final_accuracy"]["rule-heldout"] for e in ev]),
              "held-out best": (n, [e["max_accuracy"]["rule-heldout"] for e in ev])}  # fmt: skip
    held = cells[0]["dynamics"]["settings"]["heldout_shifts"] if cells else []
    chart = svg.line_chart(series, title=f"shift rules, 8 demos; held-out shifts {held}", ylabel="accuracy",
                           xlabel="number of distinct trained shifts", ymin=0.0, ymax=1.0, hlines=[CHANCE])  # fmt: skip
    rows = [[k, e["final_accuracy"]["rule"], e["max_accuracy"]["rule"], e["final_accuracy"]["rule-heldout"],
             e["max_accuracy"]["rule-heldout"], e["final_max_induction"]] for k, e in zip(n, ev)]  # fmt: skip
    header = ["trained shifts", "rule final", "rule best", "held-out final", "held-out best", "max induction"]
    return svg.page([chart], columns=1), table(header, rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phase-change")
    ap.add_argument("--record-vs-circuit")
    ap.add_argument("--task-diversity")
    ap.add_argument("--figures", default=str(FIGURES))
    args = ap.parse_args(argv)
    for name, fn, where in (("phase_change", phase_change, args.phase_change),
                            ("record_vs_circuit", record_vs_circuit, args.record_vs_circuit),
                            ("task_diversity", task_diversity, args.task_diversity)):  # fmt: skip
        if where:
            picture, text = fn(where)
            path = atomic_write_text(Path(args.figures) / f"{name}.svg", picture)
            print(f"## {name} ({where} -> {path})\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
