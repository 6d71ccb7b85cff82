"""Token roles of few-shot prompts: which demo each position belongs to and what it is.

A prompt ``[BOS] prefix k1 -> v1 SEP k2 -> v2 SEP ... kq ->`` is labelled position by position with
one of :data:`ROLE_NAMES`: ``template`` (the BOS, when the model's prompts have one, and the template
prefix), ``demo_key``, ``demo_arrow``,
``demo_label``, ``demo_sep`` (each with the index of its demo), ``query_key``, ``query_arrow`` (the
answer position). Multi-token keys and labels get the role of every one of their tokens.

Two ways to find the pieces, one labelling: :func:`roles_from_tokens` finds the arrow and separator
token ids (one token each or several) in the ids, for prompts given as ids only; :func:`roles_from_prompts`
tokenizes the prompt text cut after each piece, for any template and tokenizer (pieces a BPE merges
with a neighbour are caught), and checks the cuts are prefixes of the prompt's tokens.
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


def _find(row: list[int], pattern: list[int], lo: int, hi: int) -> list[int]:
    """Start positions of the non-overlapping occurrences of ``pattern`` inside ``row[lo:hi]``, left to right."""
    out, p, m = [], lo, len(pattern)
    while p + m <= hi:
        if row[p : p + m] == pattern:
            out.append(p)
            p += m
        else:
            p += 1
    return out


def _assign(roles: torch.Tensor, demo: torch.Tensor, b: int, start: int, pieces: list[tuple[int, int, int]]) -> int:
    """Label row ``b`` piece by piece: ``pieces`` are ``(end, role, demo_index)``, each covering
    ``start..end - 1`` after the previous one. Returns the end of the last piece."""
    for end, role, idx in pieces:
        roles[b, start:end], demo[b, start:end] = role, idx
        start = end
    return start


def roles_from_tokens(
    tokens: torch.Tensor,
    *,
    arrow_id: int | Sequence[int],
    sep_id: int | Sequence[int],
    last_positions: torch.Tensor | None = None,
    prefix_len: int = 1,
) -> PromptRoles:
    """Roles of prompts ``tokens [batch, pos]`` in the ``[prefix] k -> v SEP ... kq ->`` format, found from
    the token ids of the arrow and the separator (one id each, or a sequence for multi-token ones; the
    fixture corpus: single tokens, ``prefix_len=1`` for ``<bos>``). For text templates whose pieces a
    tokenizer may merge, :func:`roles_from_prompts` cuts the text instead.

    Raises:
        TokenizationError: a prompt that does not end with the arrow, or a demo without an arrow.
    """
    if tokens.ndim != 2:
        raise InputError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    arrow = [arrow_id] if isinstance(arrow_id, int) else [int(i) for i in arrow_id]
    sep = [sep_id] if isinstance(sep_id, int) else [int(i) for i in sep_id]
    if not arrow or not sep:
        raise InputError("arrow_id and sep_id must each name at least one token")
    batch, width = tokens.shape
    last = last_positions if last_positions is not None else torch.full((batch,), width - 1, dtype=torch.long)
    roles = torch.full((batch, width), -1, dtype=torch.long)
    demo = torch.full((batch, width), -1, dtype=torch.long)
    for b in range(batch):
        t = int(last[b])
        row = tokens[b, : t + 1].tolist()
        q_arrow = t + 1 - len(arrow)
        if row[q_arrow:] != arrow:
            raise TokenizationError(f"prompt {b} does not end with the arrow {arrow} (ends with {row[q_arrow:]})")
        pieces = [(prefix_len, 0, -1)]
        start = prefix_len
        for i, s_pos in enumerate(_find(row, sep, prefix_len, q_arrow)):  # demo i spans start..its separator
            arrows = _find(row, arrow, start, s_pos)
            if not arrows:
                raise TokenizationError(f"prompt {b}: demo {i} (positions {start}..{s_pos}) has no arrow")
            a = arrows[0]
            pieces += [(a, 1, i), (a + len(arrow), 2, i), (s_pos, 3, i), (s_pos + len(sep), 4, i)]
            start = s_pos + len(sep)
        _assign(roles, demo, b, 0, [*pieces, (q_arrow, 5, -1), (t + 1, 6, -1)])
    return PromptRoles(roles, demo, last.clone())


def roles_from_prompts(model: Any, prompts: Any, template: Any) -> PromptRoles:
    """Roles of a :class:`~icl_circuits.tasks.prompts.PromptSet` rendered with ``template``, found by
    tokenizing the prompt text cut after each piece (prefix, input, arrow, label, separator).

    Raises:
        TokenizationError: a cut whose tokens are not a prefix of the prompt's tokens (a piece
            merged with its neighbour), so positions cannot be assigned to one role.
    """
    from icl_circuits.models import bos_offset
    from icl_circuits.tasks.prompts import encode, pad_right, pad_token_id

    tokens, last = pad_right(prompts.tokens, pad_token_id(model))
    roles = torch.full(tokens.shape, -1, dtype=torch.long)
    demo = torch.full(tokens.shape, -1, dtype=torch.long)
    arrow, lead = template.io_sep.rstrip(), template.answer_lead
    for b, prompt in enumerate(prompts.prompts):
        ex, full = prompt.example, list(prompts.tokens[b])
        texts: list[tuple[str, int, int]] = [(template.prefix, 0, -1)]
        for i, d in enumerate(ex.demos):
            texts += [(d.input, 1, i), (arrow, 2, i), (lead + d.output, 3, i), (template.demo_sep, 4, i)]
        texts += [(ex.query.input, 5, -1), (arrow, 6, -1)]
        text, pieces = "", [(bos_offset(model), 0, -1)]  # the BOS, if the model's prompts have one
        for piece, role, idx in texts:
            text += piece
            ids = encode(model, text)
            if ids != full[: len(ids)]:
                raise TokenizationError(f"prompt {b}: the tokens of {text!r} are not a prefix of the prompt's tokens")
            pieces.append((len(ids), role, idx))
        covered = _assign(roles, demo, b, 0, pieces)
        if covered != len(full):
            raise TokenizationError(f"prompt {b}: roles cover {covered} of {len(full)} tokens")
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


@dataclass(frozen=True)
class RoleSlots:
    """Positions grouped by role across prompts of different token layouts.

    A *slot* is one (role, demo) piece of the prompt: ``template``, ``d1 demo_key``, ``d1 demo_arrow``,
    ``d1 demo_label``, ``d1 demo_sep``, ..., ``query_key``, ``query_arrow``. ``index [batch, pos]`` gives each
    position's slot (-1 for padding), so slot ``s`` is ``index == s`` in every prompt: the same piece of the
    prompt, however many tokens it takes there (with a real tokenizer inputs and labels differ in length,
    so one position index would fall on different pieces in different prompts). ``names [slot]``.
    """

    names: tuple[str, ...]
    index: torch.Tensor

    def __len__(self) -> int:
        return len(self.names)

    def mask(self, slot: int) -> torch.Tensor:
        """``[batch, pos]`` bool: the positions of ``slot`` in each prompt."""
        return self.index == slot


def slot_name(role: int, demo: int) -> str:
    """``d2 demo_label`` for a demo role (demos numbered 1..k as in every report), else the role name."""
    return f"d{demo + 1} {ROLE_NAMES[role]}" if demo >= 0 else ROLE_NAMES[role]


def role_slots(roles: PromptRoles) -> RoleSlots:
    """The (role, demo) slots of ``roles`` in prompt order (see :class:`RoleSlots`).

    Raises:
        InputError: prompts that do not all have the same pieces (e.g. different numbers of demos, or a
            template prefix in some only): then no slot means one thing in every prompt.
    """
    keys = [(r, d) for r, d in zip(roles.roles[0].tolist(), roles.demo_index[0].tolist()) if r >= 0]
    order = list(dict.fromkeys(keys))  # the first prompt's pieces, in order
    slot_of = {k: i for i, k in enumerate(order)}
    index = torch.full(roles.roles.shape, -1, dtype=torch.long)
    for b in range(roles.roles.shape[0]):
        row = [(r, d) for r, d in zip(roles.roles[b].tolist(), roles.demo_index[b].tolist())]
        pieces = list(dict.fromkeys(k for k in row if k[0] >= 0))
        if pieces != order:
            missing = sorted({slot_name(*k) for k in set(order) ^ set(pieces)})
            raise InputError(
                f"prompt {b} has different pieces from prompt 0 ({', '.join(missing) or 'another order'}): positions "
                "cannot be aligned by role; use prompts with the same number of demos and the same template"
            )
        index[b] = torch.tensor([slot_of[k] if k[0] >= 0 else -1 for k in row], dtype=torch.long)
    return RoleSlots(tuple(slot_name(r, d) for r, d in order), index)

