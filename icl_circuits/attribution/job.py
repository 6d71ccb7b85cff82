"""Attribution of few-shot predictions: one job that runs the patching family on a task and reports it.

:func:`attribute` draws clean/corrupted few-shot pairs of a task (:func:`icl_circuits.tasks.pairs.patching_batch`)
and measures, on the same batch:

* head outputs by exact activation patching (:mod:`icl_circuits.patching.exact`), AtP and AtP*
  (:mod:`icl_circuits.patching.atp`), with their Pearson/Spearman agreement when both are computed;
* the residual stream by layer x role slot (exact patching; demo i's input / arrow / label / separator, the
  query: each piece's tokens together, so prompts of different token layouts align), so the pieces that
  carry the task show;
* per-demo attribution of the top heads (:mod:`icl_circuits.attribution.demos`);
* path patching into the top induction head's query/key/value (:mod:`icl_circuits.patching.paths`);
* the head scan's induction heads (attention metrics on repeated random tokens) and, on request,
  function-vector heads (:mod:`icl_circuits.attribution.function_vectors`), with their overlap with the top heads.

The metric is the logit difference ``LD = logit[answer] - logit[contrast]`` at the answer position,
normalised per batch so the corrupted run is 0 and the clean run 1 (``direction="denoising"``: how
much of the clean behaviour a patch restores) -- see :mod:`icl_circuits.patching.exact`.
:func:`write_attribution` writes ``attribution.json`` (enough to recompute every number
independently: the token ids and answers are in it) and a self-contained ``attribution.html``.
"""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from icl_circuits.attribution.demos import DemoAttribution, demo_attribution
from icl_circuits.errors import InputError
from icl_circuits.patching.atp import AtPResult, attribution_patch
from icl_circuits.patching.exact import Direction, PatchEffects, activation_patch
from icl_circuits.results import Result, renamed_kwargs
from icl_circuits.tasks.pairs import PatchingBatch, patching_batch
from icl_circuits.tasks.registry import Task, get_task
from icl_circuits.tasks.roles import PromptRoles, role_slots

METHODS = ("patching", "atp", "atp*")
METHOD_CHOICES = (*METHODS, "all")
METRIC = "logit difference (answer - contrast) at the answer position, normalised: corrupted = 0, clean = 1"


def _head_effects(method: str, exact: PatchEffects | None, atp: AtPResult | None) -> PatchEffects:
    """The head-output effects of one method as :class:`PatchEffects` (same statistics for all); ``atp*`` is
    the unsigned GradDrop magnitude (:meth:`AtPResult.magnitude`), comparable with ``|exact effect|``."""
    if method == "patching":
        assert exact is not None
        return exact
    assert atp is not None
    return atp.estimate("atp") if method == "atp" else atp.magnitude()


@dataclass(frozen=True)
class Attribution(Result):
    """Everything :func:`attribute` measured on one clean/corrupted batch of a task."""

    model: str
    task: str
    n_shots: int
    corruption: str
    direction: str
    seed: int
    batch: PatchingBatch = field(repr=False)
    roles: PromptRoles | None = field(repr=False)
    token_strs: tuple[str, ...]  # the first clean prompt's tokens
    heads: dict[str, PatchEffects]  # method -> head-output effects [layer, head]
    correlations: dict[str, dict[str, float]]  # estimator -> {"pearson", "spearman"} against exact patching
    positions: PatchEffects | None  # resid_pre, [layer, role slot] (tasks.roles.RoleSlots)
    demos: DemoAttribution | None
    induction_scores: torch.Tensor | None  # [layer, head] from the head scan
    induction_heads: tuple[tuple[int, int], ...]
    paths: dict[str, PatchEffects] = field(default_factory=dict)  # receiver input -> senders [layer, head]
    path_receiver: tuple[int, int] | None = None  # a query head; its k/v are those of its key/value head
    function_vectors: Any = None  # FunctionVectorHeads when requested
    notes: tuple[str, ...] = ()  # what was skipped or is unreliable, and why (also printed as warnings)

    @property
    def primary(self) -> str:
        """The method that ranks heads: exact patching when run, else the first estimator."""
        return "patching" if "patching" in self.heads else next(iter(self.heads))

    def top_heads(self, k: int = 4, method: str | None = None) -> list[tuple[int, int]]:
        """The ``k`` heads with the largest ``|effect|`` by ``method`` (default :attr:`primary`)."""
        eff = self.heads[method or self.primary].effect()
        idx = torch.topk(eff.abs().reshape(-1), k=min(k, eff.numel())).indices
        n_heads = eff.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads) for i in idx]

    @property
    def overlap_k(self) -> int:
        """How many top heads the overlaps compare: the number of induction heads, at least 3."""
        return max(3, len(self.induction_heads))

    def induction_overlap(self, k: int | None = None) -> dict[str, Any]:
        """Which head-scan induction heads are among the top ``k`` heads (default :attr:`overlap_k`) by the
        primary method."""
        k = k or self.overlap_k
        top = self.top_heads(k)
        found = [h for h in self.induction_heads if h in top]
        return {"k": k, "top_heads": [list(h) for h in top], "induction_heads": [list(h) for h in self.induction_heads],
                "induction_heads_in_top": [list(h) for h in found],
                "all_induction_heads_in_top": bool(self.induction_heads) and len(found) == len(self.induction_heads)}

    # ------------------------------------------------------------------ views

    def to_dataframe(self) -> Any:
        """One row per head: each method's effect (and 95% interval), the induction score."""
        frames = []
        for name, eff in self.heads.items():
            df = eff.to_dataframe(seed=self.seed)[["layer", "head", "effect", "ci_low", "ci_high"]]
            frames.append(df.rename(columns={c: f"{name}_{c}" for c in ("effect", "ci_low", "ci_high")}))
        out = frames[0]
        for df in frames[1:]:
            out = out.merge(df, on=["layer", "head"])
        if self.induction_scores is not None:
            out["induction_score"] = [float(self.induction_scores[l, h]) for l, h in zip(out["layer"], out["head"])]
        out.insert(0, "name", [f"L{l}H{h}" for l, h in zip(out["layer"], out["head"])])
        key = f"{self.primary}_effect"
        return out.reindex(out[key].abs().sort_values(ascending=False).index).reset_index(drop=True)

    title = "Attribution"

    def figures(self) -> list[Any]:
        """Each method's layer x head heatmap, then the residual stream layer x position and the per-demo view."""
        figs = [eff.plot() for eff in self.heads.values()]
        figs += [self.positions.plot()] if self.positions is not None else []
        return figs + ([self.demos.plot()] if self.demos is not None else [])

    def findings(self) -> dict[str, Any]:
        """The clean and corrupted logit difference, the top heads and :meth:`summary` as the reading."""
        eff = self.heads[self.primary]
        return {"clean_logit_diff": float(eff.clean_logit_diff.mean()),
                "corrupted_logit_diff": float(eff.corrupted_logit_diff.mean()),
                "top_heads": ", ".join(f"L{l}H{h}" for l, h in self.top_heads(4)), "reading": self.summary()}

    def summary(self) -> str:
        clean, corrupted = self.heads[self.primary].clean_logit_diff, self.heads[self.primary].corrupted_logit_diff
        top = ", ".join(f"L{l}H{h} {float(self.heads[self.primary].effect()[l, h]):+.2f}" for l, h in self.top_heads(4))
        text = (f"{self.task}, {self.n_shots} shots, {len(self.batch)} pairs ({self.corruption}, {self.direction}) on "
                f"{self.model}: clean LD {float(clean.mean()):.2f}, corrupted LD {float(corrupted.mean()):.2f}; "
                f"top heads by {self.primary}: {top}")  # fmt: skip
        if self.correlations:
            text += "; agreement with exact patching: " + ", ".join(
                f"{k} r={v['pearson']:.2f}" for k, v in self.correlations.items())  # fmt: skip
        return text

    def _repr_html_(self) -> str:
        from icl_circuits.report import table_html

        return f"<div><pre>{html.escape(self.summary())}</pre>{table_html(self.to_dataframe(), max_rows=12)}</div>"

    def _head_rows(self, eff: PatchEffects) -> list[dict[str, Any]]:
        df = eff.to_dataframe(seed=self.seed)
        return [{"layer": int(r.layer), "head": int(r.head), "effect": float(r.effect), "ci_low": float(r.ci_low),
                 "ci_high": float(r.ci_high)} for r in df.itertuples()]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The ``attribution.json`` document (token ids included, so every number can be recomputed)."""
        b, primary = self.batch, self.heads[self.primary]
        method = self.primary if len(self.heads) == 1 else "all"
        doc: dict[str, Any] = {
            "model": self.model, "task": self.task, "n_shots": self.n_shots, "corruption": self.corruption,
            "direction": self.direction, "method": method, "metric": METRIC, "seed": self.seed,
            "clean_tokens": b.clean_tokens.tolist(), "corrupted_tokens": b.corrupted_tokens.tolist(),
            "answer_tokens": b.answer_tokens.tolist(), "contrast_tokens": b.contrast_tokens.tolist(),
            "answer_positions": b.last_positions.tolist(),
            "clean_metric": float(primary.clean_logit_diff.mean()),
            "corrupted_metric": float(primary.corrupted_logit_diff.mean()),
            "clean_logit_diff": primary.clean_logit_diff.tolist(),
            "corrupted_logit_diff": primary.corrupted_logit_diff.tolist(),
            "heads": self._head_rows(primary),
        }  # fmt: skip
        if len(self.heads) > 1:
            doc["methods"] = {name: self._head_rows(eff) for name, eff in self.heads.items()}
            doc["correlations"] = self.correlations
        if self.positions is not None:  # by role slot: the slot's positions in every prompt patched together
            df = self.positions.to_dataframe(seed=self.seed)
            doc["positions"] = [
                {"layer": int(r.layer), "role_slot": int(r.role), "slot": str(r.slot),
                 "effect": float(r.effect), "ci_low": float(r.ci_low), "ci_high": float(r.ci_high)}
                for r in df.itertuples()
            ]  # fmt: skip
        if self.demos is not None:
            doc["demos"] = self.demos.to_dict()
        if self.paths:
            assert self.path_receiver is not None
            doc["paths"] = {"receiver": list(self.path_receiver),
                            "inputs": {k: self._head_rows(v) for k, v in self.paths.items()}}  # fmt: skip
        doc["notes"] = list(self.notes)
        doc["induction_heads"] = [list(h) for h in self.induction_heads]
        if self.induction_scores is not None:
            doc["induction_scores"] = self.induction_scores.tolist()
            doc["induction_overlap"] = self.induction_overlap()
        if self.function_vectors is not None:
            doc["function_vectors"] = self.function_vectors.to_dict()
            if self.induction_scores is not None:
                doc["function_vectors"]["overlap_with_induction"] = self.function_vectors.overlap_with(
                    self.induction_scores, self.overlap_k)  # fmt: skip
        return doc


# ---------------------------------------------------------------------------- the job


@renamed_kwargs(n_shots="shots")
def attribute(
    model: Any,
    task: str | Task,
    *,
    shots: int = 8,
    n: int = 32,
    method: str = "all",
    corruption: str = "shuffled_labels",
    other_task: str | Task | None = None,
    direction: Direction = "denoising",
    seed: int = 0,
    positions: bool = True,
    top_k: int = 4,
    paths: bool = True,
    function_vectors: bool = False,
    progress: bool = True,
) -> Attribution:
    """Run the attribution methods on ``n`` clean/corrupted pairs of ``task`` (a name or a
    :class:`~icl_circuits.tasks.registry.Task`) with ``shots`` demos each (see the module docstring).

    Args:
        method: ``patching`` (exact), ``atp``, ``atp*`` or ``all`` (the three, plus their correlations).
        corruption: how the demos are corrupted (:data:`icl_circuits.tasks.pairs.CORRUPTIONS`).
        positions: also patch the residual stream per layer and role slot (exact; ``L * slots`` patches; each
            slot's tokens together, so prompts whose pieces differ in token length align).
        other_task: the task whose labels replace the demo labels for ``corruption="other_task_labels"``
            (a name or a Task; default: fixture tasks' recorded permutation, required for other tasks).
        top_k: heads decomposed by demo and shown in attention views.
        paths: path-patch every earlier head into the top induction head's (else top head's) q, k and v.
        function_vectors: also rank heads by their function-vector indirect effect on this task.

    Raises:
        InputError: unknown method; TaskError / TokenizationError from the pairs.
    """
    from icl_circuits.heads.scan import scan_heads, token_labels
    from icl_circuits.models import model_info

    if method not in METHOD_CHOICES:
        raise InputError(f"method must be one of {METHOD_CHOICES}, got {method!r}")
    if n < 2:
        raise InputError(f"need n >= 2 prompt pairs (bootstrap intervals), got {n}")
    wanted = METHODS if method == "all" else (method,)
    task = get_task(task, model)
    other = None if other_task is None else get_task(other_task, model)
    batch = patching_batch(model, task, shots, n, seed, corruption=corruption, other_task=other)
    args = (model, batch.clean_tokens, batch.corrupted_tokens, batch.answer_tokens, batch.contrast_tokens)
    kw: dict[str, Any] = {"direction": direction, "answer_positions": batch.last_positions}
    exact = activation_patch(*args, "z", progress=progress, **kw) if "patching" in wanted else None
    atp = None
    if "atp" in wanted or "atp*" in wanted:
        atp = attribution_patch(*args, "z", graddrop="atp*" in wanted and model.cfg.n_layers > 1, **kw)
    heads = {m: _head_effects(m, exact, atp) for m in wanted if m != "atp*" or (atp and atp.atp_star is not None)}
    correlations: dict[str, dict[str, float]] = {}
    if exact is not None and atp is not None:
        agree = atp.agreement(exact)
        names = {"atp": "atp", "atp_star": "atp*"}
        correlations = {names[k]: {"pearson": agree.pearson[k], "spearman": agree.spearman[k]}
                        for k in agree.pearson if k in names}  # fmt: skip
    notes: list[str] = []
    roles, why = _roles(model, batch, _template(model, task))
    if why:
        notes.append(f"per-demo attribution skipped: {why}")
    pos = None
    if positions and exact is not None:
        if roles is None:
            notes.append("residual stream by role skipped: no token roles to align positions across prompts")
        else:  # by role: with a real tokenizer inputs and labels differ in token length from prompt to prompt
            try:
                slots = role_slots(roles)
            except InputError as e:  # e.g. a label holding the separator token: demo counts differ
                notes.append(f"residual stream by role skipped: {e}")
            else:
                pos = activation_patch(*args, "resid_pre", per_position=True, progress=progress, roles=slots, **kw)
    primary_eff = exact if exact is not None else (atp.estimate("atp") if atp is not None else None)
    if primary_eff is not None:
        ld_gap = float((primary_eff.clean_logit_diff - primary_eff.corrupted_logit_diff).mean())
        scale = float(primary_eff.clean_logit_diff.abs().mean()) + 1e-6
        if ld_gap <= 0 or abs(ld_gap) < 1e-2 * scale:
            notes.append(f"the clean-corrupted logit-difference gap is {ld_gap:+.3g} (clean LD mean {scale:.3g}): "
                         "normalised effects divide by it and are unreliable")  # fmt: skip
    if atp is not None:
        notes.extend(f"AtP: {n}" for n in atp.notes)
    if exact is not None:
        notes.extend(f"exact patching: {n}" for n in exact.notes)
    scan = scan_heads(model, ablation=False, progress=False, seed=seed)
    att = Attribution(
        model=model_info(model).spec, task=batch.task, n_shots=shots, corruption=corruption, direction=direction,
        seed=seed, batch=batch, roles=roles, token_strs=tuple(token_labels(model, batch.clean_tokens[0])),
        heads=heads, correlations=correlations, positions=pos, demos=None,
        induction_scores=scan.scores["induction"], induction_heads=tuple(scan.induction_heads), notes=tuple(notes),
    )  # fmt: skip
    top = att.top_heads(top_k)
    extra: dict[str, Any] = {}
    if roles is not None:
        extra["demos"] = demo_attribution(model, batch.clean_tokens, batch.answer_tokens, batch.contrast_tokens, top,
                                          roles)  # fmt: skip
    receiver = next((h for h in att.induction_heads if h[0] > 0), None) or next((h for h in top if h[0] > 0), None)
    if paths and receiver is not None:
        from icl_circuits.patching.paths import path_patch

        group = int(model.cfg.n_heads) // int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)
        kv_receiver = (receiver[0], receiver[1] // group)  # grouped-query: k and v belong to a key/value head
        extra["paths"] = {x: path_patch(*args, [receiver if x == "q" else kv_receiver], x, **kw)
                          for x in ("q", "k", "v")}  # fmt: skip
        extra["path_receiver"] = receiver
    if function_vectors:
        from icl_circuits.attribution.function_vectors import function_vector_heads

        extra["function_vectors"] = function_vector_heads(model, [task], shots=shots, n=n, seed=seed)
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return replace(att, **extra)


def _template(model: Any, task: Task) -> Any:
    from icl_circuits.tasks.prompts import check_task

    return check_task(model, task).template


def _roles(model: Any, batch: PatchingBatch, template: Any) -> tuple[PromptRoles | None, str]:
    """Token roles of the clean prompts and ``""``, or ``(None, why)`` when the template's arrow and separator
    (one token or several, as in running text) cannot be found in every prompt (then no per-demo grouping and
    no residual stream by role)."""
    from icl_circuits.errors import TokenizationError
    from icl_circuits.models import bos_offset
    from icl_circuits.tasks.prompts import continuation_ids, encode
    from icl_circuits.tasks.roles import roles_from_tokens

    try:
        arrow = continuation_ids(model, "x", template.io_sep.rstrip())
        sep = continuation_ids(model, "x", template.demo_sep)
        prefix_len = len(encode(model, template.prefix)) if template.prefix else bos_offset(model)
        if not arrow or not sep:
            return None, f"the arrow ({len(arrow)} tokens) or the separator ({len(sep)} tokens) has no token"
        return roles_from_tokens(batch.clean_tokens, arrow_id=arrow, sep_id=sep,
                                 last_positions=batch.last_positions, prefix_len=prefix_len), ""  # fmt: skip
    except TokenizationError as e:
        return None, f"token roles could not be assigned ({e})"


# ---------------------------------------------------------------------------- report


def attribution_sections(att: Attribution, model: Any) -> list[Any]:
    """The sections of ``attribution.html``."""
    import pandas as pd

    from icl_circuits.report import Section, attention_html, figure_html, table_html

    sections = []
    ex = html.escape(att.batch.clean_prompts[0])
    cor = html.escape(att.batch.corrupted_prompts[0])
    ov = att.induction_overlap()
    found = ", ".join(f"L{l}H{h}" for l, h in ov["induction_heads_in_top"]) or "none"
    scanned = ", ".join(f"L{l}H{h}" for l, h in att.induction_heads) or "none"
    reading = f"{att.summary()}. Head-scan induction heads: {scanned}; among the top {ov['k']} heads: {found}."
    sections.append(Section("Summary", f"<p>Clean: <code>{ex}</code><br>Corrupted: <code>{cor}</code></p>"
                            f"<p>Metric: {html.escape(METRIC)}.</p>", reading))  # fmt: skip
    if att.notes:  # what was skipped or is unreliable: on the page, not only in the JSON and the warnings
        sections.append(Section("Skipped or unreliable", "", list(att.notes)))
    figs = "".join(figure_html(eff.plot()) for eff in att.heads.values())
    corr = ""
    if att.correlations:
        corr = table_html(pd.DataFrame(att.correlations).T.rename_axis("estimator vs exact patching"))
    note = "AtP* is an unsigned magnitude: compare it with |exact effect|." if "atp*" in att.heads else ""
    sections.append(Section("Heads: layer x head", figs + corr, note))
    sections.append(Section("Heads ranked", table_html(att.to_dataframe(), max_rows=20)))
    if att.positions is not None:
        sections.append(Section("Residual stream: layer x role", figure_html(att.positions.plot()),
                                "Denoising one piece of every prompt (demo i's input, arrow, label or separator, "
                                "the query) in the residual stream entering a layer: all of that piece's tokens "
                                "at once, whatever their number in each prompt. Where the task information sits, "
                                "layer by layer."))
    if att.demos is not None:
        sections.append(Section("Per-demo attribution of the top heads", figure_html(att.demos.plot())
                                + figure_html(att.demos.plot("norm")),
                                "Each top head's output at the answer position split by source position and "
                                "grouped by demonstration and token role."))
    if att.paths:
        import plotly.graph_objects as go

        assert att.path_receiver is not None
        l_r, h_r = att.path_receiver
        fig = go.Figure()
        for x, eff in att.paths.items():
            e = eff.effect()
            names = [f"L{l}H{h}" for l in range(e.shape[0]) for h in range(e.shape[1])]
            fig.add_bar(name=f"via {x}", x=names, y=e.reshape(-1).tolist())
        fig.update_layout(barmode="group", title=f"Path patching: each earlier head through L{l_r}H{h_r}'s q / k / v",
                          yaxis_title="effect")  # fmt: skip
        sections.append(Section(f"Paths into L{l_r}H{h_r}", figure_html(fig)))
    if att.function_vectors is not None:
        fv = att.function_vectors
        reading = fv.summary()
        if att.induction_scores is not None:
            ov = fv.overlap_with(att.induction_scores, att.overlap_k)
            reading += (f" Top {ov['k']} function-vector heads vs top {ov['k']} induction-score heads: overlap "
                        f"{ov['fraction']:.2f}, Spearman over all heads {ov['spearman']:.2f} (Yin & Steinhardt 2025 "
                        "found FV heads, more than induction heads, carry few-shot ICL in LMs).")  # fmt: skip
        sections.append(Section("Function-vector heads (Todd et al. 2024)", figure_html(fv.plot()), reading))
    top = att.top_heads(6)  # top_heads caps k at the number of heads
    _, cache = model.run_with_cache(att.batch.clean_tokens[:1],
                                    names_filter=lambda n: n.endswith("attn.hook_pattern"))  # fmt: skip
    last = int(att.batch.last_positions[0]) + 1
    pat = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, h, :last, :last] for l, h in top])
    sections.append(Section("Attention of the top heads (first clean prompt)",
                            attention_html(att.token_strs[:last], pat, [f"L{l}H{h}" for l, h in top])))
    return sections


def write_attribution(att: Attribution, model: Any, out_dir: str | Path, prov: dict[str, Any]) -> tuple[Path, Path]:
    """Write ``out_dir/attribution.json`` and the offline ``out_dir/attribution.html`` (atomically)."""
    from icl_circuits.io import atomic_write_json
    from icl_circuits.report import write_report

    out = Path(out_dir)
    doc = att.to_dict()
    doc["provenance"] = prov
    json_path = atomic_write_json(out / "attribution.json", doc)
    html_path = write_report(out / "attribution.html", f"Attribution: {att.task} on {att.model}",
                             attribution_sections(att, model), prov)  # fmt: skip
    return json_path, html_path


