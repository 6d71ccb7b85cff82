"""Token roles (icl_circuits.tasks.roles): the id parser with multi-token arrows and separators."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import TokenizationError
from icl_circuits.tasks.roles import ROLE_NAMES, roles_from_tokens

ARROW, SEP = [7, 8], [9, 9, 5]  # a two-token arrow, a three-token separator


def test_multi_token_arrow_and_separator_by_hand():
    # <bos> | k k -> v | SEP | k -> v v | SEP | q ->
    row = [0, 11, 12, *ARROW, 20, *SEP, 13, *ARROW, 21, 22, *SEP, 14, *ARROW]
    r = roles_from_tokens(torch.tensor([row]), arrow_id=ARROW, sep_id=SEP)
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
        roles_from_tokens(torch.tensor([row[:-1]]), arrow_id=ARROW, sep_id=SEP)
    with pytest.raises(TokenizationError, match="demo 0 .* has no arrow"):
        roles_from_tokens(torch.tensor([[0, 11, 20, *SEP, 14, *ARROW]]), arrow_id=ARROW, sep_id=SEP)
