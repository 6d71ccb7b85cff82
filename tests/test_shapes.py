"""Shared model-shape helpers (icl_circuits.shapes): head checks and grouped-query expansion."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import InputError
from icl_circuits.shapes import check_heads, expand_kv

pytestmark = pytest.mark.unit


def test_expand_kv_equals_hugging_face_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv  # [batch, n_kv, pos, d] -> [batch, n_heads, ...]

    kv = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0))  # 3 key/value heads
    ours = expand_kv(kv.transpose(1, 2), 6, dim=2)  # [batch, pos, n_kv, d] layout of hook_k / hook_v
    assert torch.equal(ours, repeat_kv(kv, 2).transpose(1, 2))
    assert torch.equal(ours[:, :, 1], kv[:, 0]) and torch.equal(ours[:, :, 5], kv[:, 2])  # query head h reads h // 2
    assert expand_kv(kv, 3, dim=1) is kv  # no grouping: the same tensor
    with pytest.raises(InputError, match="3 key/value heads do not divide 4 query heads"):
        expand_kv(kv, 4, dim=1)


def test_check_heads_names_what_is_wrong():
    assert check_heads([(1, 2), [0, 0], (1, 2)], 2, 4) == [(1, 2), (0, 0)]  # ints, order kept, de-duplicated
    with pytest.raises(InputError, match=r"senders \[\(2, 0\), \(0, 4\)\] outside the model \(2 layers x 4 heads\)"):
        check_heads([(2, 0), (0, 4), (1, 1)], 2, 4, what="senders")
    with pytest.raises(InputError, match="receivers is empty"):
        check_heads([], 2, 4, what="receivers", allow_empty=False)
    with pytest.raises(InputError, match="must be a sequence of \\(layer, head\\) pairs"):
        check_heads([(1,)], 2, 4)
    assert check_heads([], 2, 4) == []
