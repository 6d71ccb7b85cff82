"""Token roles (which demo and role each token has), from tokens and from prompts."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.errors import InputError, TokenizationError
from icl_circuits.tasks import roles as rl
from icl_circuits.tasks.roles import ROLE_NAMES, roles_from_tokens
from tests.helpers import ARROW, SEP


@pytest.mark.unit
def test_roles_from_tokens():
    toks = torch.tensor([[0, 10, ARROW, 11, SEP, 12, ARROW, 13, SEP, 14, ARROW]])
    r = rl.roles_from_tokens(toks, arrow_id=ARROW, sep_id=SEP)
    assert r.roles[0].tolist() == [0, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6]
    assert r.demo_index[0].tolist() == [-1, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]
    assert r.n_demos == 2 and r.last_positions.tolist() == [10]
    with pytest.raises(TokenizationError, match="does not end with the arrow"):
        rl.roles_from_tokens(toks[:, :-1], arrow_id=ARROW, sep_id=SEP)
    with pytest.raises(TokenizationError, match="no arrow"):
        rl.roles_from_tokens(torch.tensor([[0, 10, 11, SEP, 14, ARROW]]), arrow_id=ARROW, sep_id=SEP)
    with pytest.raises(InputError, match="demo_index"):
        rl.PromptRoles(r.roles, torch.full_like(r.roles, -1), r.last_positions)


@pytest.mark.fixture
def test_roles_from_prompts_match_token_parse_and_multi_token_keys(fixture_like):
    from icl_circuits.tasks.prompts import build_prompts, pad_right
    from icl_circuits.tasks.registry import FIXTURE_TEMPLATE, Pair, PairTask, get_task

    task = get_task("fixture-recorded0", fixture_like)
    ps = build_prompts(fixture_like, task, 3, 6, seed=1)
    tokens, last = pad_right(ps.tokens, 1)
    a = rl.roles_from_prompts(fixture_like, ps, task.template)
    b = rl.roles_from_tokens(tokens, arrow_id=ARROW, sep_id=SEP, last_positions=last)
    assert torch.equal(a.roles, b.roles) and torch.equal(a.demo_index, b.demo_index)
    two = PairTask("two", [Pair(f"{x} {y}", z) for x, y, z in ("abc", "def", "ghi", "jkl")], template=FIXTURE_TEMPLATE)
    ps2 = build_prompts(fixture_like, two, 2, 2, seed=0)
    r2 = rl.roles_from_prompts(fixture_like, ps2, FIXTURE_TEMPLATE)
    assert r2.roles[0].tolist() == [0, 1, 1, 2, 3, 4, 1, 1, 2, 3, 4, 5, 5, 6]


MULTI_ARROW, MULTI_SEP = [7, 8], [9, 9, 5]  # a two-token arrow, a three-token separator


@pytest.mark.unit
def test_multi_token_arrow_and_separator_by_hand():
    # <bos> | k k -> v | MULTI_SEP | k -> v v | MULTI_SEP | q ->
    row = [0, 11, 12, *MULTI_ARROW, 20, *MULTI_SEP, 13, *MULTI_ARROW, 21, 22, *MULTI_SEP, 14, *MULTI_ARROW]
    r = roles_from_tokens(torch.tensor([row]), arrow_id=MULTI_ARROW, sep_id=MULTI_SEP)
    names = [ROLE_NAMES[i] for i in r.roles[0].tolist()]
    want = (["template"] + ["demo_key"] * 2 + ["demo_arrow"] * 2 + ["demo_label"] + ["demo_sep"] * 3
            + ["demo_key"] + ["demo_arrow"] * 2 + ["demo_label"] * 2 + ["demo_sep"] * 3
            + ["query_key"] + ["query_arrow"] * 2)  # fmt: skip
    assert names == want
    assert r.demo_index[0].tolist() == [-1] + [0] * 8 + [1] * 8 + [-1] * 3 and r.n_demos == 2
    single = roles_from_tokens(torch.tensor([[0, 11, 3, 20, 4, 14, 3]]), arrow_id=3, sep_id=4)  # one-token form
    assert [ROLE_NAMES[i] for i in single.roles[0].tolist()] == [
        "template", "demo_key", "demo_arrow", "demo_label", "demo_sep", "query_key", "query_arrow"]
    with pytest.raises(TokenizationError, match="does not end with the arrow"):
        roles_from_tokens(torch.tensor([row[:-1]]), arrow_id=MULTI_ARROW, sep_id=MULTI_SEP)
    with pytest.raises(TokenizationError, match="demo 0 .* has no arrow"):
        roles_from_tokens(
            torch.tensor([[0, 11, 20, *MULTI_SEP, 14, *MULTI_ARROW]]), arrow_id=MULTI_ARROW, sep_id=MULTI_SEP
        )


@pytest.mark.fixture
def test_roles_of_a_model_without_bos(fixture_like):
    """``prepend_bos=False``: prompts lose exactly the BOS, and roles from cutting the text agree with
    an independent parse of the ids (``roles_from_tokens`` with no prefix) and with the BOS model's shifted."""
    from icl_circuits import load_model
    from icl_circuits.models import model_info
    from icl_circuits.tasks.prompts import build_prompts, pad_right
    from icl_circuits.tasks.registry import get_task

    bare = load_model(model_info(fixture_like).spec, device="cpu", prepend_bos="no")
    task = get_task("fixture-recorded0", fixture_like)
    with_bos, without = build_prompts(fixture_like, task, 3, 4, seed=1), build_prompts(bare, task, 3, 4, seed=1)
    assert all(a[0] == 0 and a[1:] == b for a, b in zip(with_bos.tokens, without.tokens))
    tokens, last = pad_right(without.tokens, 1)
    a = rl.roles_from_prompts(bare, without, task.template)
    b = rl.roles_from_tokens(tokens, arrow_id=ARROW, sep_id=SEP, last_positions=last, prefix_len=0)
    ref = rl.roles_from_prompts(fixture_like, with_bos, task.template)
    assert torch.equal(a.roles, b.roles) and torch.equal(a.demo_index, b.demo_index)
    assert torch.equal(a.roles, ref.roles[:, 1:]) and torch.equal(a.last_positions, ref.last_positions - 1)
    assert a.roles[0, 0].item() == ROLE_NAMES.index("demo_key")


@pytest.mark.unit
def test_role_slots_align_pieces_of_different_token_lengths():
    """Demo 1's input is 1 token in prompt 0 and 2 in prompt 1: slot ``d1 demo_key`` covers both, and every
    later slot is the same piece of both prompts although its position index differs."""
    tokens = torch.tensor([[0, 5, ARROW, 6, SEP, 7, ARROW, 1], [0, 5, 8, ARROW, 6, SEP, 7, ARROW]])
    last = torch.tensor([6, 7])
    slots = rl.role_slots(roles_from_tokens(tokens, arrow_id=ARROW, sep_id=SEP, last_positions=last))
    assert slots.names == ("template", "d1 demo_key", "d1 demo_arrow", "d1 demo_label", "d1 demo_sep",
                           "query_key", "query_arrow")  # fmt: skip
    key = slots.names.index("d1 demo_key")
    assert slots.mask(key).tolist() == [[False, True] + [False] * 6, [False, True, True] + [False] * 5]
    arrow = slots.names.index("query_arrow")
    assert [int(p) for p in slots.mask(arrow).nonzero()[:, 1]] == [6, 7]  # the answer position of each prompt
    assert slots.index[0, 7] == -1  # padding belongs to no slot
    fewer = torch.tensor([[0, 5, ARROW, 6, SEP, 7, ARROW], [0, 5, ARROW, 6, SEP, 7, ARROW]])
    two = roles_from_tokens(torch.cat([fewer, torch.tensor([[0, 7, ARROW, 1, 1, 1, 1]])]), arrow_id=ARROW, sep_id=SEP,
                            last_positions=torch.tensor([6, 6, 2]))  # fmt: skip
    with pytest.raises(InputError, match="cannot be aligned by role"):
        rl.role_slots(two)  # prompt 2 has no demo
