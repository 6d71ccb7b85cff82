"""Batched scoring of few-shot prompts, and accuracy by number of shots.

For each prompt, at its true last position ``t`` (prompts are right-padded, so earlier positions of
a causal model are unaffected by padding) with ``logits = model(tokens)[b, t]``:

* ``correct``: ``argmax(logits) == answer`` (the answer's first token);
* ``rank``: the number of vocabulary entries with a strictly larger logit than the answer (0 = top);
* ``logit_diff``: ``logits[answer] - logits[contrast]`` (unchanged by the per-position constant
  that compatibility mode's centred unembedding adds);
* ``prob``: ``softmax(logits)[answer]``.

Readouts at the answer position ``t`` of each right-padded prompt (a causal model's logits there do
not see the padding): :func:`padded_batch` pads ragged prompts, :func:`batch_chunks` cuts a batch into
chunks without their all-padding columns, :func:`answer_logits` gives ``[batch, d_vocab]`` under optional
hooks, and :func:`scores_from_logits` turns those into :class:`Scores`.

Cost: one forward per ``batch_size`` prompts; the full-vocabulary logits of a batch are held at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from icl_circuits.errors import InputError, TaskError
from icl_circuits.models import model_info
from icl_circuits.results import Result
from icl_circuits.tasks.prompts import PromptSet, build_prompts, check_task, pad_right, pad_token_id
from icl_circuits.tasks.registry import SubstitutedTask, Task, Template, get_task

DEFAULT_SHOTS = (0, 1, 2, 4, 8)


@dataclass(frozen=True)
class Scores:
    """Per-prompt scores, each ``[batch]``: ``correct`` (bool), ``rank`` (long), ``logit_diff``, ``prob``."""

    correct: torch.Tensor
    rank: torch.Tensor
    logit_diff: torch.Tensor
    prob: torch.Tensor

    def __len__(self) -> int:
        return int(self.correct.shape[0])

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())

    def summary(self) -> dict[str, float]:
        """Means over prompts: accuracy, rank, logit difference, probability."""
        return {
            "accuracy": self.accuracy,
            "mean_rank": float(self.rank.float().mean()),
            "logit_diff": float(self.logit_diff.mean()),
            "prob": float(self.prob.mean()),
        }


def padded_batch(
    model: Any, tokens: Sequence[Sequence[int]] | torch.Tensor, last: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens [batch, pos]`` (right-padded when given ragged lists) and ``last_positions [batch]``."""
    if isinstance(tokens, torch.Tensor):
        if tokens.ndim != 2 or tokens.is_floating_point():
            raise InputError(f"tokens must be an integer tensor [batch, pos], got {tuple(tokens.shape)}")
        full = torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long)
        return tokens.long(), (full if last is None else last.long())
    return pad_right(tokens, pad_token_id(model))


def batch_chunks(
    tokens: torch.Tensor, last: torch.Tensor, batch_size: int
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
    """``(rows, chunk [b, width], last [b])`` with columns that are padding for the whole chunk dropped."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    for lo in range(0, tokens.shape[0], batch_size):
        pos = last[lo : lo + batch_size]
        yield slice(lo, lo + len(pos)), tokens[lo : lo + batch_size, : int(pos.max()) + 1], pos


@torch.no_grad()
def answer_logits(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    last_positions: torch.Tensor | None = None,
    *,
    batch_size: int = 32,
    fwd_hooks: Sequence[tuple[str, Any]] = (),
) -> torch.Tensor:
    """``[batch, d_vocab]`` float32 logits at each prompt's last position (ragged lists or ``[batch, pos]``).

    ``fwd_hooks`` are applied inside ``model.hooks(...)`` for every chunk (removed afterwards); a
    hook sees the chunk ``[b, width, ...]``, with ``width`` the chunk's longest prompt.
    """
    padded, last = padded_batch(model, tokens, last_positions)
    device = getattr(model.cfg, "device", None) or "cpu"
    out = []
    for _, chunk, pos in batch_chunks(padded, last, batch_size):
        with model.hooks(fwd_hooks=list(fwd_hooks)):
            logits = model(chunk.to(device))
        out.append(logits[torch.arange(len(chunk)), pos.to(logits.device)].float().cpu())
    return torch.cat(out)


def scores_from_logits(final: torch.Tensor, answer_ids: torch.Tensor, contrast_ids: torch.Tensor | None) -> Scores:
    """:class:`Scores` from ``final [batch, d_vocab]`` (the module's definitions: argmax correct, strict
    rank, ``logit[a] - logit[c]`` (NaN without contrasts), softmax probability)."""
    a = answer_ids.long()[:, None]
    ans = final.gather(1, a)[:, 0]
    diff = (
        ans - final.gather(1, contrast_ids.long()[:, None])[:, 0]
        if contrast_ids is not None
        else torch.full_like(ans, float("nan"))
    )
    return Scores(
        correct=final.argmax(-1) == answer_ids,
        rank=(final > ans[:, None]).sum(-1),
        logit_diff=diff,
        prob=final.softmax(-1).gather(1, a)[:, 0],
    )


def label_log_probs(final: torch.Tensor, label_ids: torch.Tensor) -> torch.Tensor:
    """``[batch, n_labels]``: log-softmax of ``final [batch, d_vocab]`` restricted to ``label_ids [n_labels]``
    (renormalised over the labels, as Zhao et al. 2021 read label probabilities)."""
    return final[:, label_ids.long()].log_softmax(-1)


def at_chance(accuracy: float | None, chance: float, n: int, z: float = 2.0) -> bool:
    """True when ``accuracy`` over ``n`` prompts is no better than ``chance``: at most ``z`` binomial standard
    errors above it, ``accuracy <= chance + z * sqrt(chance * (1 - chance) / n)`` (``None``: not measured, True).

    Readings use it to say only what the numbers support: at chance there is no in-context update whose
    shrink (beta, :func:`shrink_coefficient`) could be read.
    """
    if accuracy is None:
        return True
    if n < 1 or not 0.0 <= chance <= 1.0:
        raise InputError(f"need n >= 1 and chance in [0, 1], got n={n}, chance={chance}")
    return float(accuracy) <= chance + z * math.sqrt(chance * (1.0 - chance) / n)


def shrink_coefficient(
    logits: torch.Tensor, logits_clean: torch.Tensor, logits_zero: torch.Tensor, labels: torch.Tensor | None = None
) -> float:
    """How far an in-context update survives a manipulation, along the clean update (all ``[batch, d_vocab]``).

    With ``L`` the log-softmax renormalised over ``labels [n_labels]`` (:func:`label_log_probs`) or, for
    ``labels=None``, over the full vocabulary, ``u = L(logits) - L(logits_zero)`` and
    ``u0 = L(logits_clean) - L(logits_zero)``::

        beta = sum_b <u_b, u0_b> / sum_b |u0_b|^2

    1: the clean update; 0: back at the zero-shot prediction (or orthogonal to the clean update);
    ``< 0``: past it. Any per-row constant added to the logits leaves ``beta`` unchanged.
    """
    if not logits.shape == logits_clean.shape == logits_zero.shape or logits.ndim != 2:
        raise InputError(f"logits must all be [batch, d_vocab], got {tuple(logits.shape)}, "
                         f"{tuple(logits_clean.shape)}, {tuple(logits_zero.shape)}")  # fmt: skip

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x.float().log_softmax(-1) if labels is None else label_log_probs(x.float(), labels)

    zero = norm(logits_zero)
    u, u0 = norm(logits) - zero, norm(logits_clean) - zero
    return float((u * u0).sum() / u0.pow(2).sum().clamp_min(1e-30))


def score_tokens(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    answer_ids: torch.Tensor,
    contrast_ids: torch.Tensor | None = None,
    *,
    last_positions: torch.Tensor | None = None,
    batch_size: int = 16,
) -> Scores:
    """Score prompts ``tokens`` (ragged lists, or ``[batch, pos]`` with ``last_positions [batch]``).

    ``answer_ids``/``contrast_ids [batch]``; without contrasts ``logit_diff`` is NaN.
    """
    padded, last = padded_batch(model, tokens, last_positions)
    n = padded.shape[0]
    if answer_ids.shape != (n,) or (contrast_ids is not None and contrast_ids.shape != (n,)):
        raise InputError(f"answer_ids/contrast_ids must be [{n}], got {tuple(answer_ids.shape)}")
    final = answer_logits(model, padded, last, batch_size=batch_size)  # [batch, vocab]
    return scores_from_logits(final, answer_ids, contrast_ids)


def score_prompts(model: Any, prompts: PromptSet, *, batch_size: int = 16) -> Scores:
    """Score a :class:`~icl_circuits.tasks.prompts.PromptSet` (answers and contrasts included)."""
    return score_tokens(model, prompts.tokens, prompts.answer_ids, prompts.contrast_ids, batch_size=batch_size)


@dataclass(frozen=True)
class Evaluation(Result):
    """Accuracy (and rank, logit difference, probability) of one task by number of shots."""

    model: str
    task: str
    seed: int
    n: int
    chance: float
    rows: tuple[dict[str, Any], ...]
    dropped_labels: tuple[str, ...] = ()
    n_dropped_pairs: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    title = "Evaluation"

    def accuracy(self, shots: int) -> float:
        for r in self.rows:
            if r["shots"] == shots:
                return float(r["accuracy"])
        raise InputError(f"no row for {shots} shots; evaluated {[r['shots'] for r in self.rows]}")

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        import pandas as pd

        return pd.DataFrame(list(self.rows)).assign(task=self.task, model=self.model)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "task": self.task, "seed": self.seed, "n": self.n, "chance": self.chance,
            "dropped_labels": list(self.dropped_labels), "n_dropped_pairs": self.n_dropped_pairs,
            "settings": dict(self.settings), "rows": [dict(r) for r in self.rows],
        }  # fmt: skip

    def plot(self) -> Any:  # plotly.graph_objects.Figure
        """Accuracy against shots, with the chance level dashed. Pure: returns the figure."""
        import plotly.graph_objects as go

        shots = [r["shots"] for r in self.rows]
        fig = go.Figure(go.Scatter(x=shots, y=[r["accuracy"] for r in self.rows], mode="lines+markers",
                                   name="accuracy"))  # fmt: skip
        fig.add_hline(y=self.chance, line_dash="dash", annotation_text="chance")
        fig.update_layout(title=f"{self.task} on {self.model} (n={self.n}, seed={self.seed})",
                          xaxis_title="shots", yaxis_title="accuracy", yaxis_range=[0, 1.05])  # fmt: skip
        return fig

    def _repr_html_(self) -> str:
        head = f"<b>{self.task}</b> on <code>{self.model}</code>, n={self.n}, chance={self.chance:.3f}"
        return head + self.to_dataframe().to_html(index=False, float_format="%.3f")


def evaluate(
    model: Any,
    task: str | Task,
    shots: Sequence[int] = DEFAULT_SHOTS,
    n: int = 100,
    seed: int = 0,
    *,
    template: Template | None = None,
    noise: float = 0.0,
    permute: bool = False,
    repeat: int = 1,
    substitute: bool | Sequence[str] = False,
    batch_size: int = 16,
) -> Evaluation:
    """Score ``n`` prompts of ``task`` for each number of ``shots``; prompts at ``k`` shots use seed ``seed + k``.

    Raises:
        TaskError: unknown task, shots above the pairs available, too few pairs after tokenization.
        PromptTooLongError: a prompt longer than the model's context.
    """
    task = get_task(task, model)
    if substitute is not False:
        task = SubstitutedTask(task) if substitute is True else SubstitutedTask(task, list(substitute))
    if not shots:
        raise TaskError("give at least one number of shots")
    checked = check_task(model, task, template)
    for k in shots:
        checked.task.check_shots(k)
    rows = []
    for k in shots:
        ps = build_prompts(model, checked, k, n, seed + k, noise=noise, permute=permute, repeat=repeat)
        rows.append({"shots": k, "n": n, **score_prompts(model, ps, batch_size=batch_size).summary()})
    settings = {"noise": noise, "permute": permute, "repeat": repeat, "substitute": bool(substitute)}
    return Evaluation(
        model_info(model).spec, checked.task.name, seed, n, 1.0 / len(checked.task.labels), tuple(rows),
        checked.dropped_labels, checked.n_dropped_pairs, settings,
    )  # fmt: skip
