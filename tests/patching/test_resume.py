"""The resumed forward: reproduces the full forward from every layer, refuses what it cannot."""

from __future__ import annotations

import pytest
import torch

from icl_circuits import InputError
from icl_circuits.patching.exact import activation_patch
from icl_circuits.patching.resume import capture_run
from tests.patching_models import make_pairs

pytestmark = pytest.mark.fixture


@pytest.mark.parametrize("model_name", ["gpt2", "gqa"])
def test_resumed_run_reproduces_the_full_forward_from_every_layer(request, model_name):
    model = request.getfixturevalue(model_name)
    for batch in (1, 3):  # batch 1: the captured mask and rotary tables broadcast instead of being tiled
        clean, _, answer, contrast, positions = make_pairs(3, batch=batch)
        run = capture_run(model, clean, [], answer, contrast, positions)
        run.check()
        assert run.sequential  # the shortcuts are verified and in use on these models
        for layer in range(model.cfg.n_layers):
            for kw in ({}, {"shortcut": False}):
                resumed = run.logit_diff_from(layer, run.resid(layer).repeat(4, 1, 1), **kw)
                torch.testing.assert_close(resumed, run.logit_diff.repeat(4), atol=1e-5, rtol=1e-5)
            from_mid = run.logit_diff_from(layer, run.mid_resid(layer).repeat(4, 1, 1), mid=True)
            torch.testing.assert_close(from_mid, run.logit_diff.repeat(4), atol=1e-5, rtol=1e-5)


def test_resume_check_refuses_blocks_it_cannot_reproduce(gqa):
    clean, _, answer, contrast, positions = make_pairs(4)
    run = capture_run(gqa, clean, [], answer, contrast, positions)
    run.check()
    args, kwargs = run.block_args[-1]
    cos, sin = kwargs["position_embeddings"]
    run.block_args[-1] = (args, {**kwargs, "position_embeddings": (torch.ones_like(cos), torch.zeros_like(sin))})
    with pytest.raises(InputError, match="unsupported for this architecture"):
        run.check()


def test_fused_activation_is_the_same_function_and_is_put_back(gpt2):
    from transformers.activations import NewGELUActivation

    clean, corrupted, answer, contrast, positions = make_pairs(7)
    kw = {"answer_positions": positions, "progress": False}
    fused = activation_patch(gpt2, clean, corrupted, answer, contrast, "z", **kw)
    plain = activation_patch(gpt2, clean, corrupted, answer, contrast, "z", fast_activations=False, **kw)
    torch.testing.assert_close(fused.patched_logit_diff, plain.patched_logit_diff, atol=1e-5, rtol=1e-5)
    acts = [m for m in gpt2.modules() if "GELU" in type(m).__name__]
    assert acts and all(type(m) is NewGELUActivation for m in acts)


def test_a_shortcut_that_raises_is_said_not_hidden(gqa, monkeypatch):
    """The shortcut check caught every exception silently; now the run falls back to whole blocks (same
    numbers), and the result says why in ``notes`` and a warning."""
    from icl_circuits.patching.resume import BaseRun

    clean, corrupted, answer, contrast, positions = make_pairs(4)
    kw = {"answer_positions": positions, "progress": False}
    want = activation_patch(gqa, clean, corrupted, answer, contrast, "z", **kw)
    assert want.notes == ()
    plain = BaseRun.logit_diff_from

    def broken(self, layer, x, fwd_hooks=(), *, mid=False, shortcut=True):
        if self.sequential and (mid or shortcut):  # only while check() tries the shortcuts
            raise RuntimeError("a bug in the shortcut")
        return plain(self, layer, x, fwd_hooks, mid=mid, shortcut=shortcut)

    monkeypatch.setattr(BaseRun, "logit_diff_from", broken)
    with pytest.warns(UserWarning, match="a bug in the shortcut"):
        got = activation_patch(gqa, clean, corrupted, answer, contrast, "z", **kw)
    assert len(got.notes) == 1 and "RuntimeError: a bug in the shortcut" in got.notes[0]
    assert got.to_dict()["notes"] == list(got.notes)
    torch.testing.assert_close(got.patched_logit_diff, want.patched_logit_diff, atol=1e-5, rtol=0)
