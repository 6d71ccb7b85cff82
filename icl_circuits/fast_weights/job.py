"""The ``icl-circuits fast-weights`` job: decomposition, transplant and predictions on one task, as JSON + HTML.

``run_fast_weights(model, task, shots)`` draws ``n`` prompts of the task (seeded), decomposes
every head (or the given heads) with :mod:`icl_circuits.fast_weights.decompose`, picks the ``n_top`` heads
whose demo part gives the answer the largest logit-lens logit (``heads="auto"``), then runs the
transplant test (:mod:`icl_circuits.fast_weights.transplant`; only for tasks with a fixed input -> output map) and
the predictions (:mod:`icl_circuits.fast_weights.predictions`) on those heads.
:func:`write_fast_weights` writes ``fast_weights.json`` and a self-contained ``fast_weights.html``.

JSON: ``{"model", "task", "shots", "heads": [{"layer", "head", "effective_rank", "singular_values",
"reconstruction_cosine", "demo_share", ...}], "transplant": {"zero_shot_acc", "with_vector_acc",
"random_control_acc", "shuffled_control_acc", ..., "fast_weight": {"with_fast_weight_acc",
"random_control_acc", "shuffled_control_acc", "softmax_memory_acc", "acc_by_rank", "acc_by_layer"}} | null,
"transplant_skipped": reason | null, "few_shot": {"accuracy", "chance", "n"}, "few_shot_at_chance",
"top_heads", "predictions", "sum_check_max_abs_error", "provenance"}``.

Cost: one forward for the decomposition, the transplant test's and the predictions' forwards
(see those modules); about a minute on the fixture on 2 CPU cores.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl_circuits.errors import InputError, TaskError
from icl_circuits.fast_weights import decompose as fw
from icl_circuits.fast_weights.predictions import Predictions, measure_predictions
from icl_circuits.fast_weights.transplant import TransplantResult, transplant_test
from icl_circuits.results import Result, renamed_kwargs
from icl_circuits.tasks.registry import Task
from icl_circuits.tasks.roles import render_examples
from icl_circuits.tasks.scoring import at_chance


@dataclass(frozen=True)
class FastWeightsRun(Result):
    """Everything one ``fast-weights`` run measured. ``few_shot``: the model's own accuracy on the task with
    ``shots`` demos (``{"accuracy", "chance", "n"}``, :func:`~icl_circuits.tasks.scoring.evaluate`), which
    decides what the reading may say (:meth:`findings`)."""

    fast_weights: fw.FastWeights
    top_heads: tuple[tuple[int, int], ...]
    transplant: TransplantResult | None
    transplant_skipped: str | None
    predictions: Predictions | None
    settings: dict[str, Any]
    few_shot: dict[str, Any] = field(default_factory=dict)

    title = "Fast weights"

    def to_dict(self) -> dict[str, Any]:
        f = self.fast_weights
        return {
            "model": f.model, "task": f.task, "shots": f.shots, "n_prompts": f.n_prompts,
            "sum_check_max_abs_error": f.max_sum_error,
            "heads": f.head_dicts(),
            "top_heads": [list(h) for h in self.top_heads],
            "transplant": None if self.transplant is None else self.transplant.to_dict(),
            "transplant_skipped": self.transplant_skipped,
            "predictions": None if self.predictions is None else self.predictions.to_dict(),
            "settings": dict(self.settings), "few_shot": dict(self.few_shot),
            "few_shot_at_chance": self.few_shot_at_chance,
        }  # fmt: skip

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        return self.fast_weights.to_dataframe()

    def figures(self) -> list[Any]:  # list[plotly Figure]
        figs = list(self.fast_weights.figures())
        figs += self.transplant.figures() if self.transplant is not None else []
        figs += self.predictions.figures() if self.predictions is not None else []
        return figs

    def _repr_html_(self) -> str:
        return self.fast_weights._repr_html_()

    @property
    def few_shot_at_chance(self) -> bool | None:
        """Is the model's few-shot accuracy no better than chance (:func:`at_chance`)? ``None``: not measured."""
        f = self.few_shot
        return None if not f else at_chance(f["accuracy"], f["chance"], int(f["n"]))

    def _transplant_reading(self) -> str:
        """What the transplant supports, computed: each insertion's accuracy against chance, then against the
        best of zero-shot and its controls (2 binomial standard errors, :func:`at_chance`)."""
        t, f = self.transplant, self.few_shot
        if t is None or not f:
            return ""
        chance, n = float(f["chance"]), t.n_test
        vec, fwt = not at_chance(t.with_vector_acc, chance, n), not at_chance(t.fast_weight_acc, chance, n)
        if not vec and not fwt:
            return (f"On the {n} held-out zero-shot queries neither the task vector ({t.with_vector_acc:.2f}) nor "
                    f"the linear fast weight ({t.fast_weight_acc:.2f}) lifts accuracy above chance ({chance:.2f}, "
                    f"2 standard errors at n = {n}): the transplant carries no task here.")  # fmt: skip
        parts = []
        for name, acc, controls in (
            ("the task vector", t.with_vector_acc, (t.random_control_acc, t.shuffled_control_acc)),
            ("the linear fast weight", t.fast_weight_acc, (t.fast_weight_random_acc, t.fast_weight_shuffled_acc)),
        ):
            base = max(t.zero_shot_acc, *controls)  # what it must beat: no insertion, and its controls
            if at_chance(acc, chance, n):
                parts.append(f"{name} leaves it at chance ({acc:.2f})")
            elif at_chance(acc, base, n):
                parts.append(f"{name} gives {acc:.2f}, no better than zero-shot or its controls (best {base:.2f})")
            else:
                parts.append(f"{name} gives {acc:.2f}, above zero-shot and its controls (best {base:.2f})")
        return (f"Held-out zero-shot accuracy {t.zero_shot_acc:.2f} (chance {chance:.2f}, n = {n}); "
                + "; ".join(parts) + ".")

    def findings(self) -> dict[str, Any]:
        """Headline numbers and a reading that states only what they support: at chance few-shot accuracy it
        says so and reads neither the transplant nor the noise shrinkage (beta)."""
        f, t, fwr = self.few_shot, self.transplant, self.fast_weights
        top = fwr.best(1)[0] if fwr.rows else None
        out: dict[str, Any] = {
            "task": fwr.task, "shots": fwr.shots, "few_shot_accuracy": f.get("accuracy"), "chance": f.get("chance"),
            "at_chance": self.few_shot_at_chance, "top_head": None if top is None else f"L{top[0]}H{top[1]}",
            "with_vector_acc": None if t is None else t.with_vector_acc,
            "with_fast_weight_acc": None if t is None else t.fast_weight_acc,
        }  # fmt: skip
        if not f:
            reading = f"{fwr.task}, {fwr.shots} shots: the few-shot accuracy was not measured, so nothing is read."
        elif self.few_shot_at_chance:
            reading = (f"{fwr.task}, {fwr.shots} shots: the model's accuracy, {f['accuracy']:.2f}, is at chance "
                       f"({f['chance']:.2f}, within 2 standard errors at n = {f['n']}): it does not do the task in "
                       "context, so the heads' fast weights carry no task to read; the transplant and the noise "
                       "shrinkage (beta) are not interpreted.")  # fmt: skip
        else:
            reading = f"{fwr.task}, {fwr.shots} shots: the model's accuracy is {f['accuracy']:.2f} (chance " \
                      f"{f['chance']:.2f}, n = {f['n']})."
            if top is not None:
                reading += f" Top head by the demo part's answer logit: L{top[0]}H{top[1]}."
            reading += (" " + self._transplant_reading()) if t is not None else ""
        out["reading"] = reading
        return out

    @property
    def skipped(self) -> list[str]:
        """What this run did not measure, and why (said on the report page and by the command)."""
        out = [f"transplant: {self.transplant_skipped}"] if self.transplant_skipped else []
        return out + [f"predictions: {s}" for s in (self.predictions.skipped if self.predictions is not None else ())]

    def sections(self) -> list[Any]:
        """The report's sections (:class:`icl_circuits.report.Section`)."""
        from icl_circuits.report import Section, figure_html, table_html

        f = self.fast_weights
        df = f.to_dataframe().sort_values("answer_dla", ascending=False)
        cols = ["layer", "head", "demo_share", "answer_dla", "effective_rank", "rank90", "reconstruction_cosine",
                "soft_reconstruction_cosine", "top_tokens"]  # fmt: skip
        top = df.iloc[0].to_dict()
        spec, roles, demos = f.figures()
        out = [
            Section("Heads: the demos' share, fast-weight rank and reconstruction", table_html(df[cols]), [
                    self.findings()["reading"],
                    f"{f.n_prompts} prompts of {f.task} with {f.shots} shots. The split of each head's output into "
                    f"roles adds up to TransformerLens's hook_z @ W_O to {f.max_sum_error:.1e}. Top head by the demo "
                    f"part's answer logit: L{top['layer']}H{top['head']} (demo share {top['demo_share']:.2f}, "
                    f"answer logit "
                    f"{top['answer_dla']:.2f}); its linear fast weight dW_lin reproduces the demo part with mean "
                    f"cosine "
                    f"{top['reconstruction_cosine']:.2f} (softmax-weighted: {top['soft_reconstruction_cosine']:.2f}). "
                    "demo_share: the demo tokens' share of the head output (projection, roles sum to 1); answer_dla: "
                    "the demo part's answer logit (logit lens); effective_rank: participation ratio of dW_lin's "
                    "singular values; rank90: singular values holding 90% of the energy. fast_weights.json also "
                    "holds the explained variance, 1 - |error|^2 / |demo part - its mean|^2, not shown: it falls far "
                    "below 0 where the demo part barely varies across prompts, and the cosine is the readable "
                    "measure of the same fit."]),
            Section("Singular spectra of dW_lin", figure_html(spec),
                    f"Participation ratio of the top head: {top['effective_rank']:.2f}; rank holding 90% of the "
                    f"energy: {top['rank90']:.1f}."),
            Section("Where the head output comes from (source roles)", figure_html(roles)),
            Section("Per-demo contributions (logit lens on the answer)", figure_html(demos)),
        ]  # fmt: skip
        if self.transplant is not None:
            t = self.transplant
            bars, sweep, fw_bars, curve = t.figures()
            out.append(Section(
                "Transplant: the task vector on held-out zero-shot queries", figure_html(bars) + figure_html(sweep),
                f"Task vector = sum of the mean demo parts of heads "
                f"{'; '.join(', '.join(f'L{l}H{h}' for l, h in fold) for fold in t.heads)} (per fold). "
                f"On {t.n_test} held-out zero-shot queries: zero-shot {t.zero_shot_acc:.2f}, with the vector "
                f"{t.with_vector_acc:.2f}, random vector of equal norm {t.random_control_acc:.2f}, vector from "
                f"shuffled-label demos {t.shuffled_control_acc:.2f}; layer chosen on validation: {list(t.layers)}. "
                + (self._transplant_reading() if not self.few_shot_at_chance else "The model is at chance with "
                   "demos (see the reading above): these accuracies are not read as a transplanted task."),
            ))  # fmt: skip
            ranks = ", ".join(f"rank {r}: {a:.2f}" for r, a in t.by_rank)
            out.append(Section(
                "Transplant: the demos' linear fast weight (b + W q~ in every head)",
                figure_html(fw_bars) + figure_html(curve),
                f"The same held-out queries, with each head's task-level linear fast weight (mean over the extraction "
                f"prompts of a_p dW_p, the first-order dual form of softmax attention) applied to its own query: "
                f"{t.fast_weight_acc:.2f}; same singular values on random directions {t.fast_weight_random_acc:.2f}; "
                f"from shuffled-label demos {t.fast_weight_shuffled_acc:.2f}; exact softmax memory {t.memory_acc:.2f}. "
                f"By rank ({ranks}): rank 0 is the bias alone, a query-independent vector.",
            ))  # fmt: skip
        else:
            out.append(Section("Transplant", "<p>Not run.</p>", self.transplant_skipped or ""))
        if self.predictions is not None:
            p = self.predictions
            figs = "".join(figure_html(x) for x in p.figures())
            skipped = [f"Not measured: {s}." for s in p.skipped]
            out.append(Section("The fast-weight predictions, measured", figs + table_html(p.to_dataframe()),
                               [_prediction_reading(p, bool(self.few_shot_at_chance)), *skipped]))  # fmt: skip
        return out


def _prediction_reading(p: Predictions, chance: bool = False) -> str:
    """The measured predictions as sentences; ``chance``: the model is at chance with demos, so beta (a shrink
    of an in-context update that is not there) is not read."""
    parts = []
    if len(p.repetition) > 1:
        a, b = p.repetition[0], p.repetition[-1]
        parts.append(f"Repeating the demos {b['repeat']}x: |dW_lin| x{b['fw_norm'] / max(a['fw_norm'], 1e-30):.2f}, "
                     f"|c_D| x{b['demo_norm'] / max(a['demo_norm'], 1e-30):.2f}, accuracy {a['accuracy']:.2f} -> "
                     f"{b['accuracy']:.2f}.")  # fmt: skip
    if len(p.noise) > 1 and chance:
        parts.append("Label noise: the model is at chance with clean demos, so there is no in-context update to "
                     "shrink; beta is not read.")
    elif len(p.noise) > 1:
        parts.append("Label noise: shrinkage beta " + ", ".join(f"{r['noise']:.2f}: {r['shrinkage_beta']:.2f}"
                                                                for r in p.noise) + ".")  # fmt: skip
    if p.order:
        rel = np.mean([r["fw_rel_change"] for r in p.order])
        other = np.mean([r["fw_rel_change_other_demos"] for r in p.order])
        parts.append(
            f"Reordering the demos changes dW_lin by {rel:.2f} of its norm (other prompts' demos: {other:.2f})."
        )
    return " ".join(parts)


@renamed_kwargs(n_prompts="n")
def run_fast_weights(
    model: Any,
    task: str | Task,
    shots: int,
    *,
    heads: str | Sequence[tuple[int, int]] = "auto",
    n_top: int = 4,
    n: int = 64,
    seed: int = 0,
    transplant: bool = True,
    predictions: bool = True,
    layer_stride: int = 1,
    n_random: int = 5,
) -> FastWeightsRun:
    """Decompose, read out, transplant and test the predictions on ``n`` prompts of ``task`` (a name or a
    :class:`~icl_circuits.tasks.registry.Task`) with ``shots`` demos (see module doc).

    ``layer_stride``: the transplant sweeps layers ``0, k, 2k, ...`` and always ``n_layers`` (the output);
    ``n_random``: its random controls (:func:`~icl_circuits.fast_weights.transplant.transplant_test`).

    Raises:
        TaskError: unknown task, bad shots; InputError: bad heads, ``layer_stride < 1``.
    """
    from icl_circuits.tasks.prompts import check_task
    from icl_circuits.tasks.registry import get_task
    from icl_circuits.tasks.scoring import evaluate

    if layer_stride < 1:
        raise InputError(f"layer_stride must be >= 1, got {layer_stride}")
    n_layers = int(model.cfg.n_layers)
    sweep = sorted(set(range(0, n_layers + 1, layer_stride)) | {n_layers})
    t = get_task(task, model)
    checked = check_task(model, t)
    checked.task.check_shots(shots)
    rng = np.random.default_rng(seed)
    examples = [checked.task.draw(rng, shots) for _ in range(n)]
    tokens, roles, answers, contrasts = render_examples(model, checked, examples)
    chosen = None if heads == "auto" else fw.parse_heads(heads, model)
    dec = fw.decompose(model, tokens, roles, chosen)
    result = fw.summarize(model, dec, answers, contrasts, task=checked.task.name, shots=shots)
    top = tuple(result.best(n_top)) if heads == "auto" else tuple(result.heads)
    tr, skipped = None, None
    if transplant:
        try:
            tr = transplant_test(model, checked.task, shots, heads="auto" if heads == "auto" else list(top),
                                 n_heads=n_top, n=n, seed=seed, layers=sweep, n_random=n_random)  # fmt: skip
        except TaskError as e:
            skipped = str(e)
    else:
        skipped = "disabled"
    pred = measure_predictions(model, checked.task, shots, top, n=n, seed=seed) if predictions else None
    ev = evaluate(model, checked.task, [shots], n=n, seed=seed)
    few_shot = {"accuracy": ev.accuracy(shots), "chance": ev.chance, "n": n}
    settings = {"heads": heads if isinstance(heads, str) else [list(h) for h in heads], "n_top": n_top,
                "n_prompts": n, "seed": seed, "transplant_layers": sweep, "n_random": n_random}  # fmt: skip
    return FastWeightsRun(result, top, tr, skipped, pred, settings, few_shot)


def write_fast_weights(run: FastWeightsRun, out: str | os.PathLike[str], provenance: dict[str, Any]) -> list[Path]:
    """Write ``out/fast_weights.json`` and ``out/fast_weights.html`` (atomically); returns their paths."""
    from icl_circuits.io import atomic_write_json
    from icl_circuits.report import write_report

    out = Path(out)
    data = {**run.to_dict(), "provenance": provenance}
    j = atomic_write_json(out / "fast_weights.json", data)
    title = f"Fast weights: {run.fast_weights.task} on {run.fast_weights.model}"
    h = write_report(out / "fast_weights.html", title, run.sections(), provenance)
    return [j, h]
