"""Clean/corrupted prompt pairs of equal token length, for activation patching.

Corruptions (:data:`CORRUPTIONS`), each changing only the demos, never the query:

* ``shuffled_labels``: the demo labels permuted among the demos, within groups of labels of the
  same token length (so the length is kept); the best of 20 permutations by number of moved labels;
* ``other_task_labels``: each demo label replaced by another task's label -- its label for the
  same input when it has one of the same token length, else a random one of that length
  (default other task for fixture tasks: a recorded permutation);
* ``filler``: every token of the demo block (separators included, template prefix excluded)
  replaced by the single token of ``template.filler`` (the demos' length kept, their content gone).

The **contrast** token is the corrupted prompt's answer where it has one -- the query's label
among the corrupted demos (``bound``-style tasks), or the other task's label of the query -- else
the clean prompt's contrast (see :mod:`icl_circuits.tasks.prompts`). Pair by pair the two token
sequences have equal length and differ only at ``changeable`` positions; otherwise
:class:`~icl_circuits.errors.TokenizationError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from icl_circuits.errors import TaskError, TokenizationError
from icl_circuits.models import bos_offset, require_tokenizer
from icl_circuits.tasks.prompts import (
    CheckedTask,
    check_length,
    check_task,
    continuation_ids,
    encode,
    pad_right,
    pad_token_id,
    render_prompt,
)
from icl_circuits.tasks.registry import FewShot, FixtureTask, Pair, Task, Template

CORRUPTIONS = ("shuffled_labels", "other_task_labels", "filler")


@dataclass(frozen=True)
class PatchingBatch:
    """Clean/corrupted prompts of equal token length pair by pair.

    ``clean_tokens``/``corrupted_tokens [batch, pos]`` (right-padded when pairs differ in length),
    ``answer_tokens``/``contrast_tokens [batch]``, ``last_positions [batch]`` (where the answer is
    read, the same in both prompts of a pair), ``changeable [batch, pos]`` (positions the corruption
    may change: the demo labels' tokens, or the whole demo block for ``filler``).
    """

    clean_tokens: torch.Tensor
    corrupted_tokens: torch.Tensor
    answer_tokens: torch.Tensor
    contrast_tokens: torch.Tensor
    last_positions: torch.Tensor
    changeable: torch.Tensor
    clean_prompts: tuple[str, ...]
    corrupted_prompts: tuple[str, ...]
    corruption: str
    task: str

    def __len__(self) -> int:
        return len(self.clean_prompts)

    def answer_positions(self) -> torch.Tensor:
        """``[batch]``: the last true position of each prompt (the same in clean and corrupted)."""
        return self.last_positions


@dataclass(frozen=True)
class _Row:
    clean: list[int]
    corrupted: list[int]
    changeable: list[bool]
    answer: int
    contrast: int
    clean_text: str
    corrupted_text: str


def _label_spans(model: Any, example: FewShot, template: Template) -> list[tuple[int, int]]:
    """Token ``[start, end)`` of each demo label in the rendered prompt (a BOS counted when the model uses one)."""
    spans = []
    for j, d in enumerate(example.demos):
        head = template.demo_block(example.demos[:j])
        start = len(encode(model, head + template.render_query(d.input)))
        spans.append((start, len(encode(model, head + template.render_demo(d)))))
    return spans


def _shuffle_labels(example: FewShot, length: Callable[[str], int], rng: np.random.Generator) -> FewShot:
    groups: dict[int, list[int]] = {}
    for i, d in enumerate(example.demos):
        groups.setdefault(length(d.output), []).append(i)
    best, best_moved = list(example.demos), 0
    for _ in range(20):
        demos = list(example.demos)
        for idx in groups.values():
            for i, j in zip(idx, rng.permutation(len(idx))):
                demos[i] = Pair(example.demos[i].input, example.demos[idx[int(j)]].output)
        moved = sum(a.output != b.output for a, b in zip(demos, example.demos))
        if moved > best_moved:
            best, best_moved = demos, moved
    return FewShot(tuple(best), example.query, example.flipped)


def _other_labels(
    example: FewShot, other: Task, length: Callable[[str], int], rng: np.random.Generator
) -> FewShot:
    demos = []
    for d in example.demos:
        want = length(d.output)
        y = other.lookup(d.input)
        if y is None or length(y) != want:
            pool = [lab for lab in other.labels if lab != d.output and length(lab) == want]
            if not pool:
                raise TokenizationError(f"task {other.name!r} has no label of {want} token(s) to replace {d.output!r}")
            y = pool[int(rng.integers(len(pool)))]
        demos.append(Pair(d.input, y))
    return FewShot(tuple(demos), example.query, example.flipped)


def _default_other(task: Task) -> Task:
    if isinstance(task, FixtureTask):
        return FixtureTask("recorded", task.cfg, recorded=1 if task.recorded == 0 else 0)
    raise TaskError(f"corruption 'other_task_labels' on task {task.name!r} needs other_task=")


def _corrupted_answer(example: FewShot, corrupted: FewShot, other: Task | None) -> str | None:
    if other is not None:
        return other.lookup(example.query.input)
    for d in corrupted.demos:
        if d.input == example.query.input:
            return d.output
    return None


def _corrupt(
    model: Any,
    example: FewShot,
    checked: CheckedTask,
    corruption: str,
    other: Task | None,
    length: Callable[[str], int],
    filler_id: int | None,
    rng: np.random.Generator,
) -> _Row | None:
    """One clean/corrupted pair, or ``None`` when the corruption leaves the example unchanged."""
    tpl = checked.template
    prompt, clean, answer, contrast = render_prompt(model, example, checked)
    check_length(model, clean, checked.task.name, example.n_shots)
    if filler_id is not None:
        lo = len(encode(model, tpl.prefix)) if tpl.prefix else bos_offset(model)
        hi = len(encode(model, tpl.demo_block(example.demos)))
        corrupt = clean[:lo] + [filler_id] * (hi - lo) + clean[hi:]
        allowed = [lo <= p < hi for p in range(len(clean))]
        corrupt_text = require_tokenizer(model).decode(corrupt[bos_offset(model) :])
    else:
        if other is not None:
            bad = _other_labels(example, other, length, rng)
        else:
            bad = _shuffle_labels(example, length, rng)
        if bad.demos == example.demos:
            return None
        corrupt_text = tpl.render(bad)
        corrupt = encode(model, corrupt_text)
        spans = _label_spans(model, example, tpl)
        allowed = [any(s <= p < e for s, e in spans) for p in range(len(clean))]
        alt = _corrupted_answer(example, bad, other)
        alt_id = checked.answer_ids.get(alt) if alt is not None else None
        if alt_id is not None and alt_id != answer:
            contrast = alt_id
    if len(corrupt) != len(clean):
        raise TokenizationError(
            f"corruption {corruption!r} changes the token length ({len(clean)} -> {len(corrupt)}) of "
            f"{prompt.text!r} -> {corrupt_text!r}; use single-token labels or corruption='filler'"
        )
    outside = [p for p in range(len(clean)) if clean[p] != corrupt[p] and not allowed[p]]
    if outside:
        raise TokenizationError(
            f"corruption {corruption!r} changed tokens {outside} outside its span in {prompt.text!r}"
        )
    return _Row(clean, corrupt, allowed, answer, contrast, prompt.text, corrupt_text)


def patching_batch(
    model: Any,
    task: Task,
    n_shots: int,
    n: int,
    seed: int = 0,
    *,
    corruption: str = "shuffled_labels",
    template: Template | None = None,
    other_task: Task | None = None,
    max_tries: int = 20,
) -> PatchingBatch:
    """``n`` clean/corrupted pairs of ``task`` with ``n_shots`` demos, deterministic for ``seed``.

    An example the corruption leaves unchanged (e.g. all demo labels equal) is re-drawn, at most
    ``max_tries`` times in a row. Examples come from ``default_rng(seed)`` as in
    :func:`~icl_circuits.tasks.prompts.build_prompts`, so the clean prompts are those it would draw
    (up to re-draws); the corruption's randomness from ``default_rng([seed, 1])``.

    Raises:
        TaskError: unknown corruption, too few shots (1 for ``filler``/``other_task_labels``, 2 for
            ``shuffled_labels``), no ``other_task`` for a non-fixture task, no changeable example.
        TokenizationError: a pair whose prompts differ in token length or outside ``changeable``;
            a ``filler`` that is not one token.
        PromptTooLongError: a prompt longer than the model's context.
    """
    if corruption not in CORRUPTIONS:
        raise TaskError(f"unknown corruption {corruption!r}; one of {CORRUPTIONS}")
    if n_shots < 1:
        raise TaskError(f"corruption {corruption!r} changes the demos, so it needs n_shots >= 1, got {n_shots}")
    if corruption == "shuffled_labels" and n_shots < 2:
        raise TaskError(f"corruption 'shuffled_labels' needs n_shots >= 2 to move labels, got {n_shots}")
    if not isinstance(n, int) or n < 1:
        raise TaskError(f"n must be a positive integer, got {n!r}")
    other = None
    if corruption == "other_task_labels":
        other = other_task if other_task is not None else _default_other(task)
    checked = check_task(model, task, template)
    checked.task.check_shots(n_shots)
    tpl = checked.template
    rng, manip = np.random.default_rng(seed), np.random.default_rng([seed, 1])

    @cache
    def length(label: str) -> int:
        return len(continuation_ids(model, tpl.render_query("x"), tpl.answer_lead + label))

    filler_id = None
    if corruption == "filler":
        filler = continuation_ids(model, tpl.render_query("x"), tpl.filler)  # the filler's token in running text
        if len(filler) != 1:
            raise TokenizationError(f"template filler {tpl.filler!r} is {len(filler)} tokens; it must be one")
        filler_id = filler[0]
    rows: list[_Row] = []
    while len(rows) < n:
        for _ in range(max_tries):
            row = _corrupt(model, checked.task.draw(rng, n_shots), checked, corruption, other, length, filler_id, manip)
            if row is not None:
                rows.append(row)
                break
        else:
            raise TaskError(
                f"task {checked.task.name!r}: {max_tries} examples in a row left unchanged by {corruption!r}"
            )
    pad = pad_token_id(model)
    clean, last = pad_right([r.clean for r in rows], pad)
    corrupted, _ = pad_right([r.corrupted for r in rows], pad)
    changeable = torch.zeros_like(clean, dtype=torch.bool)
    for i, r in enumerate(rows):
        changeable[i, : len(r.changeable)] = torch.tensor(r.changeable, dtype=torch.bool)
    return PatchingBatch(
        clean_tokens=clean,
        corrupted_tokens=corrupted,
        answer_tokens=torch.tensor([r.answer for r in rows]),
        contrast_tokens=torch.tensor([r.contrast for r in rows]),
        last_positions=last,
        changeable=changeable,
        clean_prompts=tuple(r.clean_text for r in rows),
        corrupted_prompts=tuple(r.corrupted_text for r in rows),
        corruption=corruption,
        task=checked.task.name,
    )
