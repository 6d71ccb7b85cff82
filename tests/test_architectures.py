"""The feature x architecture matrix (tests/architecture_matrix.py) and regression tests of the failures it found.

Every cell is either verified against an independent reference to 1e-4 or refused with a project error; the
refusals are listed here (``REFUSED``), so a cell that starts or stops working changes this file and the README
table (``python scripts/arch_matrix.py --readme``).
"""

from __future__ import annotations

import pytest
import torch

from icl_circuits.errors import InputError
from tests import architecture_matrix as mx
from tests.arch_models import ARCHS, build, load

pytestmark = pytest.mark.fixture  # tiny random models of each architecture, built in the test

# (architecture, cell) -> a phrase the refusal must contain: what the architecture does not support
REFUSED = {
    ("gemma2", "AtP* QK fix on q"): "attention soft-capping",
    ("gemma2", "AtP* QK fix on k"): "attention soft-capping",
    ("gemma2", "fw decomposition"): "attention soft-capping",
    ("gemma2", "fw memory read"): "attention soft-capping",
    ("gemma2", "transplant"): "attention soft-capping",
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache: dict[str, tuple] = {}

    def get(arch: str):
        if arch not in cache:
            model = load(build(arch, tmp_path_factory.mktemp(arch)))
            cache[arch] = (model, mx.make_batch(model))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_matrix(arch, models):
    model, batch = models(arch)
    bad = []
    for cell in mx.CELLS:
        r = mx.run_cell(cell, model, batch)
        want = REFUSED.get((arch, cell))
        if want is None and r.status != "verified":
            bad.append(f"{cell}: {r.status} {r.detail[:300]}")
        elif want is not None and (r.status != "refused" or want not in r.detail):
            bad.append(f"{cell}: expected a refusal naming {want!r}, got {r.status} {r.detail[:300]}")
    assert not bad, f"{arch}:\n" + "\n".join(bad)


# ---------------------------------------------------------------- regression tests (each failed before its fix)


def test_atp_on_neox_whose_rotary_hooks_never_fire(models):
    """GPT-NeoX registers hook_rot_q/k but never fires them: AtP on z raised; the QK fix now rotates q/k itself
    and matches the exact pattern change of a real forward with q patched."""
    model, b = models("neox")
    assert "blocks.0.attn.hook_rot_q" in model.hook_dict
    for cell in ("AtP z", "AtP* QK fix on q"):
        r = mx.run_cell(cell, model, b)
        assert r.status == "verified", (cell, r)


def test_softcapped_logits_give_the_real_logit_difference(models):
    """Gemma-2's final-logit soft-cap: AtP's base metric equals the real logits' LD (it was ln_final . W_U,
    silently wrong), and exact patching reproduces the capped logits (it refused, blaming block inputs)."""
    from icl_circuits.patching.atp import attribution_patch

    model, b = models("gemma2")
    assert model.cfg.output_logits_soft_cap > 0
    res = attribution_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, "z", per_position=True,
                            answer_positions=b.last, graddrop=False)  # fmt: skip
    torch.testing.assert_close(res.corrupted_logit_diff, mx._ld(model, b.corrupted, b), atol=1e-4, rtol=0)
    torch.testing.assert_close(res.clean_logit_diff, mx._ld(model, b.clean, b), atol=1e-4, rtol=0)
    for cell in ("AtP z", "patch z", "patch resid"):
        assert mx.run_cell(cell, model, b).status == "verified", cell


def test_an_unembedding_transform_that_is_not_reproduced_is_named(models, monkeypatch):
    from icl_circuits.patching.exact import activation_patch

    model, b = models("gemma2")
    monkeypatch.setattr(model.cfg, "output_logits_soft_cap", 2 * model.cfg.output_logits_soft_cap)
    with pytest.raises(InputError, match="unembedding transform"):
        activation_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, "z", answer_positions=b.last)


@pytest.mark.parametrize("arch", ["neox", "llama", "qwen2", "gemma3"])
def test_fast_weight_memory_is_position_correct_on_rotary_models(arch, models):
    """The demo memory read by a prompt's own (un-rotated) query is the heads' demo part of a direct forward:
    keys stay at their positions, the query is rotated to the extraction query's position (it crashed with a
    raw KeyError on NeoX and read un-rotated geometry elsewhere); Qwen2's sliding window is respected."""
    model, b = models(arch)
    for cell in ("fw memory read", "transplant"):
        r = mx.run_cell(cell, model, b)
        assert r.status == "verified", (cell, r)


def test_attribute_job_on_grouped_query_models_uses_kv_heads_for_k_and_v(models):
    """Llama/Qwen2 with 4 query heads and 2 key/value heads: the job picked receiver L1H3 and path patching
    rejected it for k/v ("outside the model (2 layers x 2 key/value heads)"); k and v now use its KV head."""
    from icl_circuits.attribution.job import attribute
    from icl_circuits.tasks.registry import get_task

    model, _ = models("llama")
    att = attribute(model, get_task("fixture-bound", model), shots=2, n=4, method="all", positions=True,
                    progress=False)  # fmt: skip
    assert att.path_receiver is not None and set(att.paths) == {"q", "k", "v"}
    l_r, _ = att.path_receiver
    assert att.paths["q"].patched_logit_diff.shape[:2] == (l_r, model.cfg.n_heads)
    assert att.positions is not None  # the fixture tokenizer: every prompt has the same role layout


@pytest.mark.parametrize("arch", ["neox", "qwen2", "gemma2"])
def test_attribute_job_runs_on_each_family(arch, models):
    """``attribute --method all`` failed on NeoX, Llama, Qwen2 and Gemma-2 (Llama: the test above). Every method
    runs; what a model does not allow is a note, never a raw exception."""
    import warnings

    from icl_circuits.attribution.job import attribute
    from icl_circuits.tasks.registry import get_task

    model, _ = models(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notes are also warnings; checked below
        att = attribute(model, get_task("fixture-bound", model), shots=2, n=4, method="all", progress=False)
    assert {"patching", "atp"} <= set(att.heads) and att.positions is not None and att.paths
    assert att.positions.axis_names == ("layer", "role")
    if arch == "gemma2":  # attention soft-capping: no QK split for z; plain AtP and exact patching unaffected
        assert any("soft-capping" in n for n in att.notes), att.notes


@pytest.mark.parametrize("arch", ["neox", "gemma2"])
def test_fast_weights_job_on_rotary_and_softcapped_models(arch, models):
    """``fast-weights`` crashed on NeoX with a raw KeyError; on Gemma-2 it refuses (soft-capped scores have no
    dual form) and says which features still work there."""
    from icl_circuits.errors import ICLCircuitsError
    from icl_circuits.fast_weights.job import run_fast_weights

    model, _ = models(arch)
    if arch == "gemma2":
        with pytest.raises(ICLCircuitsError, match="soft-capping.*work on such models"):
            run_fast_weights(model, "fixture-bound", 3, n=4, predictions=False)
        return
    fw = run_fast_weights(model, "fixture-bound", 3, n=4, predictions=False)
    assert fw.to_dict()["model"]
