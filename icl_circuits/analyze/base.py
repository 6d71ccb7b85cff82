"""What every analysis shares: the result protocol, the default tasks per model, and batched readouts.

An analysis is a function ``run(model, *, seed, n, tasks, progress) -> result`` registered in
:data:`icl_circuits.analyze.ANALYSES`. Its result is a small frozen dataclass (living in the module
that returns it) satisfying :class:`Analysis`: a JSON dict, a long-format DataFrame, plotly figures,
report :class:`~icl_circuits.report.Section` s whose readings are sentences computed from the numbers,
and :meth:`Analysis.findings` -- the few numbers ``record-vs-circuit`` puts side by side.

Readouts at the answer position ``t`` of each right-padded prompt (a causal model's logits there do
not see the padding): the shared ones live in :mod:`icl_circuits.tasks.scoring` (``padded_batch``,
``batch_chunks``, ``answer_logits`` ``[batch, d_vocab]``, ``scores_from_logits``); here only
:func:`head_logit_attribution` (direct logit attribution of every head); label log-probabilities
and the shrink coefficient are :func:`icl_circuits.tasks.scoring.label_log_probs` and
:func:`~icl_circuits.tasks.scoring.shrink_coefficient`.

Cost: one forward per ``batch_size`` prompts for each readout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeAlias, runtime_checkable

import torch

from icl_circuits.errors import InputError, TaskError, TokenizationError
from icl_circuits.report import Section, table_html
from icl_circuits.results import Result
from icl_circuits.tasks.defaults import uses_corpus_vocab
from icl_circuits.tasks.scoring import batch_chunks, padded_batch

if TYPE_CHECKING:
    from icl_circuits.tasks.registry import Task

#: A task argument: a registered name (``get_task``) or a :class:`~icl_circuits.tasks.registry.Task`.
TaskArg: TypeAlias = "str | Task"


@runtime_checkable
class Analysis(Protocol):
    """The result of one analysis. ``name`` is its registry key (``"shots-and-noise"``...)."""

    name: ClassVar[str]
    title: ClassVar[str]

    @property
    def model(self) -> str:
        """The model spec."""
        ...

    @property
    def seed(self) -> int: ...

    def to_dict(self) -> dict[str, Any]:
        """Everything measured, as JSON-ready plain data (no NaN: missing values are ``None``)."""
        ...

    def to_dataframe(self) -> Any:
        """The main table (pandas DataFrame)."""
        ...

    def figures(self) -> list[Any]:
        """The panels, plotly Figures; pure (no show, no files)."""
        ...

    def plot(self) -> Any:
        """One plotly Figure: the panels stacked (:func:`icl_circuits.results.combine_figures`)."""
        ...

    def sections(self) -> list[Section]:
        """Report sections, each with a reading computed from the numbers."""
        ...

    def findings(self) -> dict[str, Any]:
        """The headline numbers (flat ``name -> float | str | None``) and ``"reading"``: one computed sentence."""
        ...

    def _repr_html_(self) -> str: ...


class AnalysisMixin(Result):
    """The :class:`~icl_circuits.results.Result` surface for analysis dataclasses; ``_repr_html_``: the title,
    the readings (one per section), then the main table."""

    title: ClassVar[str] = ""

    def _repr_html_(self) -> str:
        import html

        sections: list[Section] = self.sections()  # type: ignore[attr-defined]
        readings = "".join(f"<p>{html.escape(p)}</p>" for s in sections for p in s.paragraphs)
        df = self.to_dataframe()  # type: ignore[attr-defined]
        return f"<h4>{html.escape(self.title)}</h4>{readings}{table_html(df, max_rows=20)}"


# ---------------------------------------------------------------- which tasks a model can run


#: Task files tried, in this order, as the defaults for models outside the fixture vocabulary.
LM_TASKS: tuple[str, ...] = (
    "antonym", "country-capital", "english-french", "present-past", "singular-plural", "lowercase-uppercase",
    "word-first-letter", "number-successor",
)  # fmt: skip


def task_label(task: TaskArg) -> str:
    """The key a task has in an analysis's rows: the name given, or the ``Task``'s ``name``."""
    return task if isinstance(task, str) else str(task.name)


def pick_tasks(
    model: Any,
    tasks: Sequence[TaskArg] | None,
    fixture: Sequence[str],
    lm: Sequence[str] = LM_TASKS,
    *,
    min_shots: int = 1,
    count: int = 2,
) -> list[TaskArg]:
    """``tasks`` when given (names or ``Task`` s, each resolved later by ``get_task``); else ``fixture`` for
    models on the corpus vocabulary; else the first ``count`` tasks of ``lm`` that the model's tokenizer can
    score (answers with distinct first tokens, see :func:`icl_circuits.tasks.prompts.check_task`) with at least
    ``min_shots`` demos.

    Raises:
        TaskError: ``tasks`` is empty or two share a name, or no task of ``lm`` is usable (each one's reason listed).
    """
    from icl_circuits.tasks.prompts import check_task
    from icl_circuits.tasks.registry import get_task

    if tasks is not None:
        chosen = [t for t in tasks if not isinstance(t, str) or t]
        if not chosen:
            raise TaskError("tasks must name at least one task (see `icl-circuits tasks`)")
        labels = [task_label(t) for t in chosen]
        if len(set(labels)) < len(labels):
            raise TaskError(f"tasks must have distinct names (they key the results), got {labels}")
        return chosen
    if uses_corpus_vocab(model):
        return list(fixture)
    usable: list[TaskArg] = []
    why = []
    for name in lm:
        try:
            checked = check_task(model, get_task(name, model))
        except (TaskError, TokenizationError) as e:
            why.append(str(e))
            continue
        if checked.task.max_shots < min_shots:
            why.append(f"task {name!r}: at most {checked.task.max_shots} shots with this tokenizer, {min_shots} needed")
            continue
        usable.append(name)
        if len(usable) == count:
            break
    if not usable:
        raise TaskError("no default task is usable with this model; pass tasks=... (--tasks). " + "; ".join(why))
    return usable


def check_positive(**values: int) -> None:
    """Raise :class:`InputError` naming every argument that is not a positive integer."""
    bad = {k: v for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
    if bad:
        raise InputError("must be positive integers: " + ", ".join(f"{k}={v!r}" for k, v in bad.items()))


# ---------------------------------------------------------------- readouts at the answer position


@torch.no_grad()
def head_logit_attribution(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    answer_ids: torch.Tensor,
    contrast_ids: torch.Tensor,
    last_positions: torch.Tensor | None = None,
    *,
    batch_size: int = 32,
) -> torch.Tensor:
    """``[batch, layer, head]``: each head's direct effect on ``logit[answer] - logit[contrast]`` at the answer.

    ``dla[b, l, h] = (z[b, t, l, h] @ W_O[l, h]) . (W_U[:, a_b] - W_U[:, c_b]) / scale_b`` with
    ``z = blocks.{l}.attn.hook_z``, ``t`` the prompt's last position and ``scale_b`` the final
    LayerNorm's scale there (``ln_final.hook_scale``); equals TransformerLens's
    ``ActivationCache.stack_head_results(apply_ln=True)`` projected on the same direction. ``b_O`` is
    shared by all heads and not attributed.
    """
    padded, last = padded_batch(model, tokens, last_positions)
    n = padded.shape[0]
    if answer_ids.shape != (n,) or contrast_ids.shape != (n,):
        raise InputError(f"answer_ids/contrast_ids must be [{n}], got {tuple(answer_ids.shape)}, "
                         f"{tuple(contrast_ids.shape)}")  # fmt: skip
    L = int(model.cfg.n_layers)
    W_O = model.W_O.detach().float().cpu()  # [L, H, d_head, d_model]
    W_U = model.W_U.detach().float().cpu()
    direction = (W_U[:, answer_ids.long()] - W_U[:, contrast_ids.long()]).T  # [batch, d_model]
    wanted = {f"blocks.{l}.attn.hook_z" for l in range(L)} | {"ln_final.hook_scale"}
    device = getattr(model.cfg, "device", None) or "cpu"
    out = []
    for rows, chunk, pos in batch_chunks(padded, last, batch_size):
        _, cache = model.run_with_cache(chunk.to(device), names_filter=lambda name: name in wanted)
        b = torch.arange(len(chunk))
        z = torch.stack([cache[f"blocks.{l}.attn.hook_z"][b, pos].float().cpu() for l in range(L)], 1)  # [b, L, H, e]
        scale = cache["ln_final.hook_scale"][b, pos].float().cpu().reshape(len(chunk), 1, 1)
        per_head = torch.einsum("blhe,lhed,bd->blh", z, W_O, direction[rows])
        out.append(per_head / scale)
    return torch.cat(out)


# ---------------------------------------------------------------- small formatting helpers for readings


def fmt(x: float | None, digits: int = 2) -> str:
    """``x`` with ``digits`` decimals, or ``n/a``."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def head_name(head: Sequence[int]) -> str:
    return f"L{int(head[0])}H{int(head[1])}"


def finite(x: float) -> float | None:
    """``x`` as a float, ``None`` when NaN or infinite (JSON has no NaN)."""
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def change(a: float | None, b: float | None, tol: float = 0.02) -> str:
    """``"rises from A to B"``, ``"falls from A to B"`` or ``"stays at A"`` (within ``tol``), computed."""
    if a is None or b is None:
        return f"goes from {fmt(a)} to {fmt(b)}"
    if abs(b - a) <= tol:
        return f"stays at {fmt(a)} (to {fmt(b)})"
    return f"{'rises' if b > a else 'falls'} from {fmt(a)} to {fmt(b)}"
