"""The observations that tell a record stored in the weights from an in-context circuit, as runnable analyses.

Each analysis is registered in :data:`ANALYSES` (an explicit dict: name -> :class:`AnalysisSpec`) and
runs as ``icl-circuits analyze NAME [--model SPEC] [--seed S] [--out DIR] [--n N] [--tasks T,...]``, as
``python analyses/<name>.py [same options]`` (thin wrappers over the CLI) or from Python::

    from icl_circuits import load_model
    from icl_circuits.analyze import run_analysis, save_analysis
    model = load_model("fixture:icl-tiny")
    result = run_analysis("shots-and-noise", model, seed=0)
    result.to_dataframe(); result.plot(); result.findings()["reading"]
    save_analysis(result, model, "out/analyses", seed=0)   # NAME.json + NAME.html

Every result satisfies :class:`~icl_circuits.analyze.base.Analysis`; the modules state their math,
sign conventions and cost.
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from icl_circuits.analyze.base import Analysis, TaskArg
from icl_circuits.analyze.information_flow import run_information_flow
from icl_circuits.analyze.label_binding import run_label_binding
from icl_circuits.analyze.order import run_order
from icl_circuits.analyze.record_vs_circuit import run_record_vs_circuit
from icl_circuits.analyze.repetition import run_repetition
from icl_circuits.analyze.shots_noise import run_shots_and_noise
from icl_circuits.analyze.unseen_task import run_unseen_task
from icl_circuits.errors import InputError


@dataclass(frozen=True)
class AnalysisSpec:
    """A registered analysis: its name, the question it answers, and its run function
    ``run(model, *, seed, n, tasks, progress) -> Analysis``."""

    name: str
    question: str
    run: Callable[..., Analysis]


ANALYSES: dict[str, AnalysisSpec] = {
    spec.name: spec
    for spec in (
        AnalysisSpec("order", "accuracy and logit-difference spread across demo orders, with and without "
                     "contextual calibration; the heads whose attribution moves most", run_order),
        AnalysisSpec("shots-and-noise", "accuracy and logit difference against demos and label noise; the shrink "
                     "toward the zero-shot prediction", run_shots_and_noise),
        AnalysisSpec("unseen-task", "tasks whose rule never occurred in training: accuracy by shots and the heads "
                     "responsible", run_unseen_task),
        AnalysisSpec("repetition", "the same demos repeated r times: the effect on the prediction and on the "
                     "fast-weight magnitude", run_repetition),
        AnalysisSpec("label-binding", "recorded vs bound vs rule tasks with their own and with arbitrary symbol "
                     "labels; which need the induction heads (mean ablation)", run_label_binding),
        AnalysisSpec("information-flow", "label-word anchor flows by layer: saliency S_wp, S_pq, S_ww "
                     "(Wang et al. 2023)", run_information_flow),
        AnalysisSpec("record-vs-circuit", "the six observations side by side on one page (runs them all)",
                     run_record_vs_circuit),
    )
}  # fmt: skip


def get_analysis(name: str) -> AnalysisSpec:
    """The registered analysis ``name``; :class:`InputError` listing the known names otherwise."""
    spec = ANALYSES.get(name)
    if spec is None:
        raise InputError(f"unknown analysis {name!r}; known: {', '.join(ANALYSES)}")
    return spec


def run_analysis(
    name: str,
    model: Any,
    *,
    seed: int = 0,
    n: int | None = None,
    tasks: Sequence[TaskArg] | None = None,
    progress: bool = True,
) -> Analysis:
    """Run analysis ``name`` on ``model`` (``n``: prompts per condition, ``None``: the analysis's default;
    ``tasks``: names or :class:`~icl_circuits.tasks.registry.Task` s, ``None``: the analysis's defaults)."""
    return get_analysis(name).run(model, seed=seed, n=n, tasks=tasks, progress=progress)


def _setting_value(text: str) -> Any:
    """``"4"`` -> 4, ``"0.5"`` -> 0.5, ``"true"``/``"false"`` -> bool, ``"0,2,4"`` -> (0, 2, 4), a word -> itself
    (a comma list of words -> a tuple of them: task names)."""
    if "," in text:
        return tuple(_setting_value(t.strip()) for t in text.split(",") if t.strip())
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _typed(run: Callable[..., Any], param: str, value: Any) -> Any:
    """A single value for a ``Sequence`` parameter of ``run`` as a 1-tuple (``--set shots=2`` -> ``(2,)``)."""
    annotation = str(inspect.signature(run).parameters[param].annotation)
    return (value,) if "Sequence" in annotation and not isinstance(value, tuple) else value


def parse_settings(name: str, given: Sequence[str]) -> dict[str, Any]:
    """``icl-circuits analyze NAME --set KEY=VALUE ...`` -> keyword arguments of the analysis's run function.

    ``KEY``: a size parameter of that function (``n_orders``, ``shots``, ``head_shots``, ...; ``n`` and
    ``tasks`` have their own options); for ``record-vs-circuit`` ``PART.PARAM`` (``order.n_orders``), collected
    as ``{"options": {part: {param: value}}}`` (a part's ``n``/``tasks`` replace the run's for that part).
    ``VALUE``: an int, a float, ``true``/``false``, a word, or a comma-separated list of them (a tuple; one
    value for a parameter that takes a sequence is a 1-tuple).

    Raises:
        InputError: no ``=``, an unknown analysis, part or parameter (the known ones listed).
    """
    from icl_circuits.analyze.record_vs_circuit import PARTS, part_parameters

    spec = get_analysis(name)
    options: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for item in given:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip():
            raise InputError(f"--set takes KEY=VALUE, got {item!r}")
        if spec.name == "record-vs-circuit":
            part, dot, param = key.partition(".")
            allowed = part_parameters(part) if dot else []
            if param not in allowed:
                raise InputError(f"--set {item!r}: record-vs-circuit takes PART.PARAM" + (
                    f"; part {part!r} takes {', '.join(allowed)}" if allowed else ""))  # fmt: skip
            run = next(r for p, r, _ in PARTS if p == part)
            options.setdefault(part, {})[param] = _typed(run, param, _setting_value(value.strip()))
            continue
        allowed = [p for p in inspect.signature(spec.run).parameters
                   if p not in ("model", "seed", "n", "tasks", "progress")]  # fmt: skip
        if key not in allowed:
            raise InputError(f"--set {item!r}: {spec.name} takes no {key!r}; it takes {', '.join(allowed)} "
                             "(n and tasks: --n, --tasks)")  # fmt: skip
        out[key] = _typed(spec.run, key, _setting_value(value.strip()))
    return {**out, "options": options} if options else out


def save_analysis(
    result: Analysis, model: Any, out_dir: str | os.PathLike[str], *, seed: int, **args: Any
) -> tuple[Path, Path]:
    """Write ``out_dir/NAME.json`` (results + provenance) and the offline report ``out_dir/NAME.html``
    (``NAME`` with underscores); a result made of parts (``record-vs-circuit``) also writes each part's JSON
    (its page holds every part's sections, so plotly.js is inlined once, not once per part), and its Markdown
    summary table as ``NAME.md``."""
    from icl_circuits.io import atomic_write_json, atomic_write_text, provenance
    from icl_circuits.report import write_report

    out = Path(out_dir)
    for part in getattr(result, "parts", ()):
        part_prov = provenance(model, seed, analysis=part.name, **args)
        atomic_write_json(out / f"{part.name.replace('-', '_')}.json", {**part.to_dict(), "provenance": part_prov})
    prov = provenance(model, seed, analysis=result.name, **args)
    stem = result.name.replace("-", "_")
    json_path = atomic_write_json(out / f"{stem}.json", {**result.to_dict(), "provenance": prov})
    html_path = write_report(out / f"{stem}.html", f"{result.title}: {result.model}", result.sections(), prov)
    markdown = getattr(result, "markdown", None)
    if callable(markdown):  # record-vs-circuit: the summary table, for the README
        atomic_write_text(out / f"{stem}.md", f"{markdown()}\n")
    return json_path, html_path


def run_from_args(name: str, args: argparse.Namespace) -> int:
    """Load the model, run, print the reading, write JSON + HTML (``icl-circuits analyze NAME``; ``args``: the
    model options of :func:`icl_circuits.cli.add_model_args` plus ``out``, ``n``, ``tasks`` and ``set``, the
    ``KEY=VALUE`` size settings of :func:`parse_settings`, recorded in the provenance as given)."""
    from icl_circuits.models import load_model

    spec = get_analysis(name)
    settings = parse_settings(name, getattr(args, "set", None) or [])  # bad settings fail before the load
    given = getattr(args, "loaded_model", None)  # icl_circuits.cli.main(..., model=...)
    if given is None:
        bos = str(getattr(args, "bos", "auto"))
        given = load_model(args.model, tokenizer=args.tokenizer, device=args.device, prepend_bos=bos)
    model = given
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    result = spec.run(model, seed=args.seed, n=args.n, tasks=tasks, progress=True, **settings)
    print(result.findings()["reading"])
    for part in (result, *getattr(result, "parts", ())):
        for what in getattr(part, "skipped", ()):
            print(f"skipped ({part.name}): {what}")
    paths = save_analysis(result, model, args.out, seed=args.seed, model_spec=args.model, tokenizer=args.tokenizer,
                          n=args.n, tasks=tasks, settings=getattr(args, "set", None) or [])  # fmt: skip
    print(f"wrote {paths[0]} and {paths[1]}")
    return 0


__all__ = ["ANALYSES", "Analysis", "AnalysisSpec", "get_analysis", "parse_settings", "run_analysis", "save_analysis"]
