"""Token roles of few-shot prompts: which demo each position belongs to and what it is.

A prompt ``[BOS] prefix k1 -> v1 SEP k2 -> v2 SEP ... kq ->`` is labelled position by position with
one of :data:`ROLE_NAMES`: ``template`` (BOS and the template prefix), ``demo_key``, ``demo_arrow``,
``demo_label``, ``demo_sep`` (each with the index of its demo), ``query_key``, ``query_arrow`` (the
answer position). Multi-token keys and labels get the role of every one of their tokens.

Two ways to get them: :func:`roles_from_tokens` parses token ids with a single-token arrow and
separator (the fixture corpus); :func:`roles_from_prompts` tokenizes the prompt text cut after each
piece, for any template and tokenizer, and checks the cuts are prefixes of the prompt's tokens.
:func:`render_examples` renders few-shot examples to tokens, roles and answers in one step.

Cost: ``roles_from_prompts`` tokenizes ``4 * shots + 3`` prefixes per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from icl_circuits.errors import InputError, PromptTooLongError, TokenizationError

ROLE_NAMES: tuple[str, ...] = (
    "template", "demo_key", "demo_arrow", "demo_label", "demo_sep", "query_key", "query_arrow",
)  # fmt: skip


@dataclass(frozen=True)
class PromptRoles:
    """Each position's role and demo: ``roles [batch, pos]`` (index into :data:`ROLE_NAMES`, -1 for
    padding), ``demo_index [batch, pos]`` (-1 outside demos), ``last_positions [batch]`` (the query)."""

    roles: torch.Tensor
    demo_index: torch.Tensor
    last_positions: torch.Tensor

    def __post_init__(self) -> None:
        if self.roles.ndim != 2 or self.demo_index.shape != self.roles.shape:
            raise InputError(f"roles/demo_index must both be [batch, pos], got {tuple(self.roles.shape)} "
                             f"and {tuple(self.demo_index.shape)}")  # fmt: skip
        if self.last_positions.shape != (self.roles.shape[0],):
            raise InputError(f"last_positions must be [{self.roles.shape[0]}], got {tuple(self.last_positions.shape)}")
        in_demo = self.demo_index >= 0
        demo_role = (self.roles >= 1) & (self.roles <= 4)
        if bool((in_demo != demo_role).any()):
            raise InputError("demo_index must be >= 0 exactly at demo roles (demo_key..demo_sep)")

    @property
    def n_demos(self) -> int:
        return int(self.demo_index.max()) + 1 if self.demo_index.numel() else 0


def roles_from_tokens(
    tokens: torch.Tensor,
    *,
    arrow_id: int,
    sep_id: int,
    last_positions: torch.Tensor | None = None,
    prefix_len: int = 1,
) -> PromptRoles:
    """Roles of prompts ``tokens [batch, pos]`` in the ``[prefix] k -> v SEP ... kq ->`` format with
    single-token arrow and separator (the fixture corpus: ``prefix_len=1`` for ``<bos>``).

    Raises:
        TokenizationError: a prompt that does not end with the arrow, or a demo without an arrow.
    """
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    batch, width = tokens.shape
    last = last_positions if last_positions is not None else torch.full((batch,), width - 1, dtype=torch.long)
    roles = torch.full((batch, width), -1, dtype=torch.long)
    demo = torch.full((batch, width), -1, dtype=torch.long)
    for b in range(batch):
        t = int(last[b])
        row = tokens[b, : t + 1].tolist()
        if row[t] != arrow_id:
            raise TokenizationError(f"prompt {b} does not end with the arrow token {arrow_id} (ends with {row[t]})")
        roles[b, :prefix_len] = 0
        start, i = prefix_len, 0
        seps = [p for p in range(prefix_len, t) if row[p] == sep_id]
        for end in seps:  # demo i spans start..end (end = its separator)
            arrows = [p for p in range(start, end) if row[p] == arrow_id]
            if not arrows:
                raise TokenizationError(f"prompt {b}: demo {i} (positions {start}..{end}) has no arrow token")
            a = arrows[0]
            roles[b, start:a], roles[b, a], roles[b, a + 1 : end], roles[b, end] = 1, 2, 3, 4
            demo[b, start : end + 1] = i
            start, i = end + 1, i + 1
        roles[b, start:t], roles[b, t] = 5, 6
    return PromptRoles(roles, demo, last.clone())


def roles_from_prompts(model: Any, prompts: Any, template: Any) -> PromptRoles:
    """Roles of a :class:`~icl_circuits.tasks.prompts.PromptSet` rendered with ``template``, found by
    tokenizing the prompt text cut after each piece (prefix, input, arrow, label, separator).

    Raises:
        TokenizationError: a cut whose tokens are not a prefix of the prompt's tokens (a piece
            merged with its neighbour), so positions cannot be assigned to one role.
    """
    from icl_circuits.tasks.prompts import encode, pad_right, pad_token_id

    tokens, last = pad_right(prompts.tokens, pad_token_id(model))
    roles = torch.full(tokens.shape, -1, dtype=torch.long)
    demo = torch.full(tokens.shape, -1, dtype=torch.long)
    arrow, lead = template.io_sep.rstrip(), template.answer_lead
    for b, prompt in enumerate(prompts.prompts):
        ex, full = prompt.example, list(prompts.tokens[b])
        pieces: list[tuple[str, int, int]] = [(template.prefix, 0, -1)]
        for i, d in enumerate(ex.demos):
            pieces += [(d.input, 1, i), (arrow, 2, i), (lead + d.output, 3, i), (template.demo_sep, 4, i)]
        pieces += [(ex.query.input, 5, -1), (arrow, 6, -1)]
        text, prev = "", 1
        roles[b, 0] = 0
        for piece, role, idx in pieces:
            text += piece
            ids = encode(model, text)
            if ids != full[: len(ids)]:
                raise TokenizationError(f"prompt {b}: the tokens of {text!r} are not a prefix of the prompt's tokens")
            roles[b, prev : len(ids)], demo[b, prev : len(ids)] = role, idx
            prev = len(ids)
        if prev != len(full):
            raise TokenizationError(f"prompt {b}: roles cover {prev} of {len(full)} tokens")
    return PromptRoles(roles, demo, last)


def render_examples(
    model: Any, checked: Any, examples: Sequence[Any]
) -> tuple[torch.Tensor, PromptRoles, torch.Tensor, torch.Tensor]:
    """Few-shot examples (:class:`~icl_circuits.tasks.registry.FewShot`) of a checked task -> right-padded
    ``tokens [batch, pos]``, their roles, ``answer_ids [batch]`` and ``contrast_ids [batch]``."""
    from icl_circuits.tasks.prompts import PromptSet, pad_right, pad_token_id, render_prompt

    if not examples:
        raise InputError("no examples to render")
    rendered = [render_prompt(model, ex, checked) for ex in examples]
    ps = PromptSet(checked.task.name, examples[0].n_shots, 0, tuple(r[0] for r in rendered),
                   tuple(tuple(r[1]) for r in rendered), torch.tensor([r[2] for r in rendered]),
                   torch.tensor([r[3] for r in rendered]))  # fmt: skip
    tokens, _ = pad_right(ps.tokens, pad_token_id(model))
    if tokens.shape[1] > int(model.cfg.n_ctx):
        raise PromptTooLongError(
            f"task {checked.task.name!r} with {examples[0].n_shots} shots gives {tokens.shape[1]}-token prompts, "
            f"longer than the model's context ({model.cfg.n_ctx})"
        )
    return tokens, roles_from_prompts(model, ps, checked.template), ps.answer_ids, ps.contrast_ids
