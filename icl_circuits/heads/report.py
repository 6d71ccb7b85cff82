"""The sections of the head-scan HTML report (heatmaps, ranked table, circuit, attention views).

Pure: a :class:`~icl_circuits.heads.scan.HeadScan` (and the model, for the attention views) in, a
list of :class:`~icl_circuits.report.Section` out; :func:`save_head_scan`
writes the page and the JSON beside it. The only model work is one forward of one example for the attention views.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from icl_circuits.io import atomic_write_json, provenance
from icl_circuits.report import Section, figure_html, table_html, write_report

if TYPE_CHECKING:
    from icl_circuits.heads.scan import HeadScan


def _grid(figs: list[Any]) -> str:
    cells = "".join(f'<div style="flex:0 0 auto">{figure_html(f)}</div>' for f in figs)
    return f'<div style="display:flex;flex-wrap:wrap;gap:8px">{cells}</div>'


def _circuit_table(scan: HeadScan) -> str:
    import pandas as pd

    rows = []
    base = scan.baselines["K"]
    for f in scan.circuit:
        l_r, h_r = f.receiver
        senders = list(dict.fromkeys([*f.feeders, *f.ablation_feeders]))
        for l, h in senders:
            k = float(scan.composition["K"][l, h, l_r, h_r])
            drop = None if scan.induction_change is None else -float(scan.induction_change[l, h, l_r, h_r])
            rows.append(
                {
                    "induction head": f"L{l_r}H{h_r}",
                    "feeder": f"L{l}H{h}",
                    "found by": " + ".join(
                        name for name, hit in (("K-composition", (l, h) in f.feeders),
                                               ("ablation", (l, h) in f.ablation_feeders)) if hit
                    ),
                    "K-composition": k,
                    "z vs random": (k - base.mean) / base.std,
                    "induction lost when ablated": drop,
                    "feeder roles": ", ".join(scan.roles(l, h)) or "-",
                }
            )
        if not senders:
            rows.append({"induction head": f"L{l_r}H{h_r}", "feeder": "none stands out"})
    if not rows:
        return "<p>No induction head, so no circuit to name.</p>"
    return table_html(pd.DataFrame(rows), max_rows=200)


def ranked_note(n_heads: int, shown: int) -> str:
    """The ranked table's note: "the 20 highest of 36" only when some are left out, else "all 16 heads"."""
    if n_heads > shown:
        return f"The {shown} highest induction scores of {n_heads} heads; head_scan.json holds every head."
    return f"All {n_heads} heads, by induction score."


def head_scan_sections(scan: HeadScan, model: Any) -> list[Section]:
    """The report: summary, heatmaps, ranked table, circuit (with composition heatmaps), attention views."""
    th = scan.thresholds
    ablated = "ablation" in scan.scores
    summary = Section(
        "Summary",
        f"<pre>{html.escape(scan.summary())}</pre>",
        f"Measured on {scan.batch} sequences {scan.layout} with |r| = {scan.seq_len} random ordinary tokens "
        f"(seed {scan.seed}); prefix matching on {scan.prefix_repeats} copies of |r| = {scan.prefix_seq_len}. "
        f"Induction head: induction score >= {th.induction} and it acts on what it attends to: copying > "
        f"{th.min_copying:g}"  # :g and + 0.0: "0", never "-0.0"
        + (f" or mean-ablation effect < {-th.min_ablation + 0.0:g} nats (the sweep on the first "
           f"{scan.ablation_batch} sequences)." if ablated else " (ablation sweep skipped).")
        + f" Previous-/duplicate-token: score >= {th.previous_token} / {th.duplicate_token}; "
        f"copying: OV eigenvalue positivity >= {th.copying}.",
    )
    heat = Section(
        "Per-head scores (layer x head)",
        _grid(scan.figures()),
        "Attention scores are fractions of a query's attention in [0, 1]. Copying is sum Re(lambda) / sum |lambda| "
        "of the full OV circuit W_E W_V W_O W_U (+1: copies). The ablation effect is the change of the "
        "in-context gain (loss early - loss late, nats) when the head's output is replaced by its mean, "
        "ablated minus clean: negative = the head helps in-context learning.",
    )
    ranked = Section(
        "Heads ranked by induction score",
        table_html(scan.to_dataframe(), max_rows=20),
        ranked_note(scan.n_layers * scan.n_heads, 20),
    )
    k_base = scan.baselines["K"]
    circuit = Section(
        "Circuit: which earlier heads feed each induction head",
        _circuit_table(scan) + figure_html(scan.plot_composition("K"))
        + (figure_html(scan.plot_composition("ablation")) if scan.induction_change is not None else ""),
        f"K-composition ||W_OV^A (W_QK^B)^T||_F / (||W_OV^A||_F ||W_QK^B||_F) of sender A into receiver B, as z "
        f"against random matrices of the same shapes (mean {k_base.mean:.3f}, std {k_base.std:.3f}). A feeder "
        f"stands out by z >= {th.feeder_min_z} and at least {th.feeder_fraction:.0%} of the largest excess into "
        "that head (direct path only). Ablation: the induction score the head loses when the earlier head is "
        f"mean-ablated (every path, through MLPs too); a feeder loses >= {th.feeder_min_drop} and at least "
        f"{th.feeder_fraction:.0%} of the largest loss. Receivers shown: the induction heads plus the highest "
        "induction scores above layer 0.",
    )
    top = scan.top_heads()
    views = Section(
        "Attention of the top heads on one example",
        scan.attention_html(model, top, example=0),
        "Sequence 0 of the scan. An induction head's query in the second copy attends to the token after the "
        "first occurrence of the current token (the stripe n - 1 below the diagonal); a previous-token head "
        "attends one position back. Heads: " + ", ".join(f"L{l}H{h}" for l, h in top) + ".",
    )
    return [summary, heat, ranked, circuit, views]


def save_head_scan(scan: HeadScan, model: Any, out_dir: str | os.PathLike[str], **args: Any) -> tuple[Path, Path]:
    """Write ``out_dir/head_scan.json`` and the offline report ``out_dir/head_scan.html``; returns both paths.

    ``args`` are recorded in the provenance block (with the scan's own settings).
    """

    out = Path(out_dir)
    prov = provenance(
        model, scan.seed, seq_len=scan.seq_len, batch=scan.batch, prefix_repeats=scan.prefix_repeats,
        ablation="ablation" in scan.scores, ablation_batch=scan.ablation_batch, **args,
    )
    doc = scan.to_dict()
    doc["provenance"] = prov
    json_path = atomic_write_json(out / "head_scan.json", doc)
    html_path = write_report(out / "head_scan.html", f"Head scan: {scan.model}", head_scan_sections(scan, model), prov)
    return json_path, html_path
