"""Dynamics over checkpoints: measured from each saved checkpoint, events computed from the curves."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import icl_circuits.lab.train as lt
from icl_circuits.heads.scan import scan_heads
from icl_circuits.lab.config import load_config
from icl_circuits.lab.dynamics import drop_step, first_at_or_above, run_dynamics, steepest_step, write_dynamics
from icl_circuits.models import load_model

pytestmark = pytest.mark.fixture


@pytest.mark.unit
def test_event_detectors():
    steps = [0, 10, 20, 30]
    assert first_at_or_above(steps, [0.0, 0.2, 0.5, 0.9], 0.4) == 20
    assert first_at_or_above(steps, [0.0, 0.2, 0.3, 0.1], 0.4) is None
    assert drop_step(steps, [0.0, -0.1, -1.0, -1.2], 0.3) == 20  # half of the 1.2 fall is passed at 20
    assert drop_step(steps, [0.0, -0.1, -0.2, -0.1], 0.3) is None
    assert steepest_step(steps, [0.0, 0.2, 0.7, 0.8], rising=True) == 20
    assert steepest_step([0, 10, 30], [0.0, -0.5, -1.2], rising=False) == 10  # per step: -0.05 vs -0.035
    assert steepest_step([0], [0.0], rising=True) is None


def test_cut_down_phase_change_run_is_measured_from_its_checkpoints(tmp_path):
    """The shipped phase-change config, cut to 20 steps (batch 16) with 3 checkpoints: every number comes from a
    checkpoint (re-measured here from the saved weights), the events are computed from those series, and the
    untrained checkpoint has no induction head."""
    before = torch.get_num_threads()
    try:
        cfg = replace(load_config("analyses/lab/phase_change.toml"), steps=20, checkpoint_every=10, batch_size=16)
        lt.train(cfg, tmp_path / "run", threads=1, progress=False)
    finally:
        torch.set_num_threads(before)
    dyn = run_dynamics(tmp_path / "run", n=8, progress=False)
    assert dyn.steps == (0, 10, 20)
    remeasured, ics = [], []
    for i, step in enumerate(dyn.steps):
        model = load_model(str(tmp_path / "run" / f"step-{step:06d}"), device="cpu")
        scan = scan_heads(model, seq_len=20, batch=16, seed=0, ablation=False, progress=False)
        assert dyn.heads["induction"][i] == scan.scores["induction"].tolist()
        assert dyn.in_context_score[i] == scan.in_context_score
        remeasured.append(scan.scores["induction"])
        ics.append(scan.in_context_score)
    ev = dyn.events()
    n_layers, n_heads = remeasured[0].shape
    assert dyn.formation_steps() == {
        f"L{l}H{h}": first_at_or_above(list(dyn.steps), [float(m[l, h]) for m in remeasured], 0.4)
        for l in range(n_layers) for h in range(n_heads)
    }  # fmt: skip
    assert ev["ics_drop_step"] == drop_step(list(dyn.steps), ics, 0.3)
    best = [float(m.max()) for m in remeasured]
    assert ev["induction_steepest_step"] == steepest_step(list(dyn.steps), best, rising=True)
    assert ev["ics_steepest_step"] == steepest_step(list(dyn.steps), ics, rising=False)
    assert ev["untrained_max_induction"] == float(remeasured[0].max()) < 0.4
    assert all(s != 0 for s in dyn.formation_steps().values())  # no head is an induction head untrained
    assert {"bound-unseen", "recorded-rare"} <= set(dyn.families)
    json_path, html_path = write_dynamics(dyn, tmp_path / "out")
    saved = json.loads(json_path.read_text())
    assert saved["steps"] == [0, 10, 20] and saved["reading"] == dyn.reading()
    assert "Training dynamics" in html_path.read_text()
