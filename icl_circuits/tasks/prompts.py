"""Few-shot prompts from tasks: tokenization checks, manipulations, and clean/corrupted pairs.

* An answer is identified by its **first token in context**: the token(s) that ``prompt`` +
  ``template.answer_lead`` + answer adds after the prompt's own tokens. :func:`check_task` computes it
  for every label of a task with the model's tokenizer, drops the labels (and their pairs) whose
  first tokens collide, counts them, and raises when too few pairs are left.
* :func:`build_prompts` draws ``n`` examples deterministically for a seed: examples come from
  ``default_rng(seed)`` and the manipulations (label noise, demo permutation) from a second
  stream ``default_rng([seed, 1])``, so the same seed gives the same examples with or without them.
  Manipulations apply in the order: flip labels, permute demos, repeat demos.
* The **contrast** label of a prompt is the latest demo label whose first token differs from the
  answer's; with no such demo, the next label of the task (in sorted order) after the answer.

Clean/corrupted pairs for patching are in :mod:`icl_circuits.tasks.pairs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from icl_circuits.errors import PromptTooLongError, TaskError, TokenizationError
from icl_circuits.models import model_info, require_tokenizer, uses_bos
from icl_circuits.tasks.registry import FewShot, Pair, SubstitutedTask, Task, Template

# ---------------------------------------------------------------- tokenization


def encode(model: Any, text: str) -> list[int]:
    """The tokens of ``text`` with the model's tokenizer, never truncated, after a BOS when the model's
    prompts start with one (:func:`~icl_circuits.models.uses_bos`: a per-model setting)."""
    require_tokenizer(model, "building prompts from text")
    if not text and not uses_bos(model):
        return []
    return model.to_tokens(text, prepend_bos=uses_bos(model), truncate=False, move_to_device=False)[0].tolist()


def continuation_ids(model: Any, prompt: str, continuation: str) -> list[int]:
    """The tokens ``continuation`` adds after ``prompt`` (both tokenized together).

    Raises:
        TokenizationError: when the prompt's own tokens are not a prefix of the joint tokens
            (the continuation merges into the prompt's last token), or it adds no token.
    """
    head, full = encode(model, prompt), encode(model, prompt + continuation)
    if full[: len(head)] != head or len(full) == len(head):
        raise TokenizationError(
            f"{continuation!r} does not tokenize as separate tokens after {prompt[-30:]!r}; "
            "change the template's io_sep so the answer starts a new token"
        )
    return full[len(head) :]


def pad_token_id(model: Any) -> int:
    """The id right-padding uses: the tokenizer's pad id, else BOS, else 0 (never read as an answer)."""
    tok = getattr(model, "tokenizer", None)
    for attr in ("pad_token_id", "bos_token_id"):
        value = getattr(tok, attr, None) if tok is not None else None
        if value is not None:
            return int(value)
    return 0


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged token lists -> ``tokens [batch, pos]`` right-padded, ``last_positions [batch]``."""
    if not seqs:
        raise TaskError("no prompts to pad")
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
    return out, torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)


@dataclass(frozen=True)
class CheckedTask:
    """A task restricted to labels whose first tokens are distinct, with each label's token id."""

    task: Task
    template: Template
    answer_ids: dict[str, int]
    dropped_labels: tuple[str, ...]
    n_dropped_pairs: int

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task.name, "size": self.task.size, "n_labels": len(self.answer_ids),
                "dropped_labels": list(self.dropped_labels), "n_dropped_pairs": self.n_dropped_pairs}  # fmt: skip


def check_task(model: Any, task: Task, template: Template | None = None, *, min_pairs: int = 2) -> CheckedTask:
    """Identify each label of ``task`` by its first token; drop colliding labels and count them.

    Raises:
        TaskError: fewer than ``min_pairs`` pairs (or 2 labels) survive.
        TokenizationError: a label does not start a new token after the template's separator.
    """
    template = template or task.template
    context = template.render_query("x")
    first = {lab: continuation_ids(model, context, template.answer_lead + lab)[0] for lab in task.labels}
    by_token: dict[int, list[str]] = {}
    for lab, tid in first.items():
        by_token.setdefault(tid, []).append(lab)
    dropped = tuple(sorted(lab for labs in by_token.values() if len(labs) > 1 for lab in labs))
    size = task.size
    try:
        kept = task.without_labels(frozenset(dropped)) if dropped else task
    except TaskError as e:
        raise TaskError(f"{e} (tokenizer of model {model_info(model).spec!r})") from e
    n_dropped = 0 if size is None or kept.size is None else size - kept.size
    if len(kept.labels) < 2:
        raise TaskError(f"task {task.name!r} has {len(kept.labels)} distinct label(s) usable; at least 2 needed")
    if kept.size is not None and kept.size < min_pairs:
        raise TaskError(
            f"task {task.name!r}: {kept.size} pairs left with model {model_info(model).spec!r} after dropping "
            f"{n_dropped} whose answers collide at their first token; at least {min_pairs} needed"
        )
    ids = {lab: first[lab] for lab in kept.labels}
    return CheckedTask(kept, template, ids, dropped, n_dropped)


# ---------------------------------------------------------------- manipulations (pure)


def permute_demos(example: FewShot, rng: np.random.Generator) -> FewShot:
    """The same demos (with their flip marks) in a random order; the query unchanged."""
    order = rng.permutation(example.n_shots)
    return replace(
        example,
        demos=tuple(example.demos[int(i)] for i in order),
        flipped=tuple(example.flipped[int(i)] for i in order),
    )


def repeat_demos(example: FewShot, r: int) -> FewShot:
    """The demo block repeated ``r`` times in a row (``d1..dk d1..dk ...``); the query unchanged."""
    if not isinstance(r, int) or r < 1:
        raise TaskError(f"repeat must be an integer >= 1, got {r!r}")
    return replace(example, demos=example.demos * r, flipped=example.flipped * r)


def flip_labels(example: FewShot, fraction: float, labels: Sequence[str], rng: np.random.Generator) -> FewShot:
    """Replace exactly ``round(fraction * n_shots)`` demo labels, chosen at random, by other ``labels``.

    A flipped label always differs from the one it replaces; inputs and the query are unchanged.
    """
    if not 0.0 <= fraction <= 1.0:
        raise TaskError(f"noise fraction must be in [0, 1], got {fraction}")
    k = int(round(fraction * example.n_shots))
    if k == 0:
        return example
    if len(set(labels)) < 2:
        raise TaskError("flipping labels needs at least 2 distinct labels")
    chosen = set(int(i) for i in rng.choice(example.n_shots, size=k, replace=False))
    demos, flipped = list(example.demos), list(example.flipped)
    for i in sorted(chosen):
        others = [lab for lab in labels if lab != demos[i].output]
        demos[i] = Pair(demos[i].input, others[int(rng.integers(len(others)))])
        flipped[i] = True
    return FewShot(tuple(demos), example.query, tuple(flipped))


# ---------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt: its text (answer excluded), answer, contrast label and example."""

    text: str
    answer: str
    contrast: str
    example: FewShot


@dataclass(frozen=True)
class PromptSet:
    """Prompts with their token ids (ragged), ``answer_ids [batch]`` and ``contrast_ids [batch]``."""

    task: str
    n_shots: int
    seed: int
    prompts: tuple[Prompt, ...]
    tokens: tuple[tuple[int, ...], ...]
    answer_ids: torch.Tensor
    contrast_ids: torch.Tensor
    n_dropped_pairs: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self.prompts]

    def padded(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [batch, pos]`` right-padded with ``pad_id`` and ``last_positions [batch]``."""
        return pad_right(self.tokens, pad_id)


def _contrast(example: FewShot, answer_id: int, checked: CheckedTask) -> str:
    for d in reversed(example.demos):
        tid = checked.answer_ids.get(d.output)
        if tid is not None and tid != answer_id:
            return d.output
    labels = checked.task.labels
    start = labels.index(example.query.output) if example.query.output in labels else -1
    for step in range(1, len(labels) + 1):
        lab = labels[(start + step) % len(labels)]
        if checked.answer_ids[lab] != answer_id:
            return lab
    raise TaskError(f"task {checked.task.name!r} has no label to contrast with {example.query.output!r}")


def check_length(model: Any, ids: Sequence[int], task: str, n_shots: int) -> None:
    """Raise :class:`PromptTooLongError` when ``ids`` exceed the model's context."""
    n_ctx = int(model.cfg.n_ctx)
    if len(ids) > n_ctx:
        raise PromptTooLongError(
            f"task {task!r} with {n_shots} shots gives a {len(ids)}-token prompt, longer than the context of "
            f"{model_info(model).spec!r} ({n_ctx}); use fewer shots or repeats"
        )


def render_prompt(model: Any, example: FewShot, checked: CheckedTask) -> tuple[Prompt, list[int], int, int]:
    """Render and tokenize one example: ``(prompt, token ids, answer id, contrast id)``.

    Raises:
        TokenizationError: the answer's first token in context disagrees with the task's label map.
    """
    text = checked.template.render(example)
    ids = encode(model, text)
    answer = example.query.output
    if answer not in checked.answer_ids:
        raise TaskError(f"task {checked.task.name!r}: answer {answer!r} is not among the checked labels")
    answer_id = checked.answer_ids[answer]
    full = encode(model, text + checked.template.answer_lead + answer)
    in_context = full[len(ids)] if len(full) > len(ids) and full[: len(ids)] == ids else None
    if in_context != answer_id:
        raise TokenizationError(
            f"answer {answer!r} does not start with token {answer_id} after {text[-30:]!r} (it starts with "
            f"{in_context}, None: it merges into the prompt); change the template's io_sep"
        )
    contrast = _contrast(example, answer_id, checked)
    return Prompt(text, answer, contrast, example), ids, answer_id, checked.answer_ids[contrast]


def build_prompts(
    model: Any,
    task: Task | CheckedTask,
    n_shots: int,
    n: int,
    seed: int = 0,
    *,
    template: Template | None = None,
    noise: float = 0.0,
    permute: bool = False,
    repeat: int = 1,
    substitute: bool | Sequence[str] = False,
) -> PromptSet:
    """``n`` prompts of ``task`` with ``n_shots`` demos (``0``: zero-shot), deterministic for ``seed``.

    Args:
        noise: fraction of demo labels flipped to another label of the task (exact count, rounded).
        permute: shuffle the demo order (after drawing; the pairs are kept).
        repeat: repeat the demo block this many times.
        substitute: replace labels by arbitrary symbols (``True``: the default symbols, or a list);
            see :class:`~icl_circuits.tasks.registry.SubstitutedTask`.

    Raises:
        TaskError: bad ``n``/``n_shots``, more shots than pairs, too few pairs after tokenization.
        PromptTooLongError: a prompt longer than the model's context.
    """
    if not isinstance(n, int) or n < 1:
        raise TaskError(f"n must be a positive integer, got {n!r}")
    if substitute is not False:
        if isinstance(task, CheckedTask):
            raise TaskError("substitute= needs a Task, not a CheckedTask: check the SubstitutedTask instead")
        task = SubstitutedTask(task) if substitute is True else SubstitutedTask(task, list(substitute))
    checked = task if isinstance(task, CheckedTask) else check_task(model, task, template)
    checked.task.check_shots(n_shots)
    rng, manip = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    prompts, tokens, answers, contrasts = [], [], [], []
    for _ in range(n):
        ex = checked.task.draw(rng, n_shots)
        ex = flip_labels(ex, noise, checked.task.labels, manip)
        ex = permute_demos(ex, manip) if permute else ex
        ex = repeat_demos(ex, repeat)
        prompt, ids, a, c = render_prompt(model, ex, checked)
        check_length(model, ids, checked.task.name, n_shots)
        prompts.append(prompt)
        tokens.append(tuple(ids))
        answers.append(a)
        contrasts.append(c)
    return PromptSet(
        checked.task.name, n_shots, seed, tuple(prompts), tuple(tokens),
        torch.tensor(answers), torch.tensor(contrasts), checked.n_dropped_pairs,
    )  # fmt: skip
