"""Token roles (which demo and role each token has), from tokens and from prompts."""

from __future__ import annotations

import pytest
import torch

from icl_circuits.errors import InputError, TokenizationError
from icl_circuits.tasks import roles as rl
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
