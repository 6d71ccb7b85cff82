"""The in-context linear regression model and its committed fixture against one GD step."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from icl_circuits.errors import InputError
from tests.helpers import FIXTURES, ROOT, require_fixture

pytestmark = pytest.mark.fixture




def test_regression_fixture_matches_one_gd_step():
    """Stated bound: on fresh data the trained LSA's predictions have cosine >= 0.98 with one GD step, N = 1..20."""
    require_fixture("regression-tiny", "lsa_config.json")
    from icl_circuits.fast_weights.regression import compare_with_gd, load_lsa

    model = load_lsa()
    record = json.loads((FIXTURES / "regression-tiny" / "record.json").read_text())
    weights = (FIXTURES / "regression-tiny" / "model.safetensors").read_bytes()
    assert hashlib.sha256(weights).hexdigest() == record["sha256"] and len(weights) < 10 * 2**20
    cmp = compare_with_gd(model, n_demos=(1, 2, 5, 10, 20), batch=1024, seed=7)
    assert cmp.min_prediction_cosine() >= 0.98
    assert all(r["readout_gap"] < 1e-4 for r in cmp.rows)  # y_hat = w_model . x_q exactly
    assert min(r["update_cosine"] for r in cmp.rows if r["n_demos"] >= 2) >= 0.95


def test_regression_readout_is_exact_and_untrained_control_fails():
    from icl_circuits.fast_weights.regression import LinearSelfAttention, LSAConfig, compare_with_gd, sample_regression

    model = LinearSelfAttention(LSAConfig(d=3, n_heads=2), torch.Generator().manual_seed(1))
    demos, xq, _, _ = sample_regression(torch.Generator().manual_seed(0), 16, 4, 3)
    with torch.no_grad():
        assert torch.allclose(model(demos, xq), (model.update(demos) * xq).sum(-1), atol=1e-6)
    untrained = compare_with_gd(LinearSelfAttention(LSAConfig()), batch=512)
    assert max(abs(r["prediction_cosine"]) for r in untrained.rows) < 0.6  # the cosine test can fail
    with pytest.raises(InputError):
        model(demos[..., :2], xq)


def test_regression_training_script_runs(tmp_path):
    cmd = [sys.executable, "-m", "fixtures.train_regression", "--steps", "300", "--out", str(tmp_path / "r")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    from icl_circuits.fast_weights.regression import load_lsa

    assert load_lsa(tmp_path / "r").cfg.d == 5
    assert (tmp_path / "r" / "model.safetensors").stat().st_size < 10 * 2**20
