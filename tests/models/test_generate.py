"""``generate()`` on every kind of model ``load_model`` returns: the KV-cached greedy tokens equal the uncached ones.

Before the repair in ``models.loading`` (transformers 5.x hands attention the cache as ``cache=``, which
TransformerBridge 4.3 never read), cached decoding attended to the new token alone and diverged after the
first token on every model here.
"""

from __future__ import annotations

import pytest
import torch

from icl_circuits import list_fixtures, load_model

pytestmark = pytest.mark.fixture  # real-model tests also carry real_model

GPT2_FIXTURES = [name for name in ("icl-tiny", "induction-2l") if name in list_fixtures()]


def _cached_and_uncached(model, tokens: torch.Tensor, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
    kw = {"max_new_tokens": n_new, "do_sample": False, "verbose": False, "stop_at_eos": False}
    cached = model.generate(tokens, use_past_kv_cache=True, **kw)
    uncached = model.generate(tokens, use_past_kv_cache=False, **kw)
    return cached, uncached


def _greedy_by_full_forwards(model, tokens: torch.Tensor, n_new: int) -> torch.Tensor:
    """The reference: one full forward per new token, argmax of the last position."""
    out = tokens.clone()
    with torch.no_grad():
        for _ in range(n_new):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def test_fixtures_are_present():
    assert GPT2_FIXTURES == ["icl-tiny", "induction-2l"], "fixtures missing: run `make fixtures`"


@pytest.mark.parametrize("name", GPT2_FIXTURES)
def test_cached_generate_equals_uncached_on_fixture(name):
    model = load_model(f"fixture:{name}", device="cpu")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, model.cfg.d_vocab, (2, 10), generator=g)
    tokens[:, 0] = model.tokenizer.bos_token_id
    tokens[:, 5:] = tokens[:, :5]  # a repeat, so an induction model has something to continue
    cached, uncached = _cached_and_uncached(model, tokens, 12)
    assert torch.equal(uncached, _greedy_by_full_forwards(model, tokens, 12))
    assert torch.equal(cached, uncached), f"cached {cached[:, 10:].tolist()} != uncached {uncached[:, 10:].tolist()}"


def test_cached_generate_equals_uncached_on_tiny_gpt2(tiny_gpt2):
    tokens = torch.tensor([[0, 7, 3, 9, 11, 7, 3]])
    cached, uncached = _cached_and_uncached(tiny_gpt2, tokens, 10)
    assert torch.equal(cached, uncached)


@pytest.mark.shared
def test_cached_generate_equals_uncached_on_llama2c(aidreams):
    from tests.models.test_llama2c import GREEDY_IDS

    tokens = torch.tensor([[1]])
    cached, uncached = _cached_and_uncached(aidreams, tokens, len(GREEDY_IDS))
    assert cached[0, 1:].tolist() == GREEDY_IDS
    assert torch.equal(cached, uncached)


@pytest.mark.real_model
def test_cached_generate_equals_uncached_on_smollm2(smollm2):
    tokens = smollm2.to_tokens("Once upon a time, there was a")
    cached, uncached = _cached_and_uncached(smollm2, tokens, 6)  # uncached = full forwards: checked above
    assert torch.equal(cached, uncached), smollm2.to_string(cached[0]) + " != " + smollm2.to_string(uncached[0])
