"""The shipped lab experiments: sweep files that load into checked cells (held-out shifts never trained), run by
the library's sweep (a failing cell recorded, a rerun computes only the missing cell), and the README figures
built from the sweep's output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import icl_circuits.lab.sweep as sw
from analyses.lab import figures
from icl_circuits import InputError
from icl_circuits.lab.config import load_config, read_table

pytestmark = pytest.mark.fixture

LAB = Path(__file__).resolve().parents[2] / "analyses" / "lab"


@pytest.mark.unit
def test_shipped_sweep_files_expand_to_checked_cells():
    files = sorted(LAB.glob("*.sweep.toml"))
    assert {p.name for p in files} >= {"record_vs_circuit.sweep.toml", "task_diversity.sweep.toml"}
    for path in files:
        spec = sw.load_sweep(path)
        cells = spec.cells()
        raw = read_table(path)
        assert spec.kind == "train" and spec.base_config == load_config(LAB / raw["sweep"]["base"])
        assert spec.seeds == (0,) and spec.dynamics["n"] == 48, path  # the README's settings
        assert len(cells) == math.prod(len(v) for v in raw["grid"].values())
        assert len({c.cell_id for c in cells}) == len(cells)  # one folder per cell
        held = raw.get("dynamics", {}).get("heldout", [])
        assert held == spec.dynamics.get("heldout", [])
        for c in cells:  # fixed held-out shifts are never trained on
            assert c.dynamics == spec.dynamics and not set(held) & set(c.config["corpus"]["train_shifts"])
    assert sw.load_sweep(LAB / "task_diversity.sweep.toml").dynamics["heldout"] == [20, 21, 22]


@pytest.mark.unit
def test_held_out_shifts_that_a_cell_trains_on_are_refused(tmp_path):
    (tmp_path / "base.toml").write_text("steps = 4\n[corpus]\ntrain_shifts = [1, 2]\n")
    head = '[sweep]\nkind = "train"\nbase = "base.toml"\n'
    for text, match in (
        (head + '[grid]\n"corpus.train_shifts" = [[1], [1, 20]]\n[dynamics]\nheldout = [20]\n',
         r"grid cell \{'corpus.train_shifts': \[1, 20\]\} \(seed 0\) trains on the held-out shift\(s\) \[20\]"),
        (head + "[dynamics]\nheldout = [2, 3]\n", r"trains on the held-out shift\(s\) \[2\]"),
        (head + "[dynamics]\nheldout = [26]\n", "heldout must be a non-empty list of shifts"),
        (head + "[dynamics]\nheldout = 20\n", "heldout must be a non-empty list of shifts"),
        (head + "[dynamics]\nheldout = [20, 20]\n", "heldout lists a shift twice"),
        (head + "heldout_shifts = [20]\n", r"heldout_shifts is now \[dynamics\] heldout"),
    ):  # fmt: skip
        (tmp_path / "s.toml").write_text(text)
        with pytest.raises(InputError, match=match):
            sw.load_sweep(tmp_path / "s.toml")


def test_a_sweep_records_a_failing_cell_reruns_only_it_and_the_figures_read_its_output(tmp_path, monkeypatch):
    """Tiny cells train and are measured on the sweep's held-out shift; a cell whose training raises is recorded
    and the next goes on; the rerun trains only the failed cell; the figures read every finished cell."""
    (tmp_path / "base.toml").write_text(
        'name = "t"\nn_layer = 2\nn_head = 2\nn_embd = 16\nn_inner = 16\nsteps = 4\nbatch_size = 4\nwarmup = 1\n'
        "checkpoint_every = 4\n[corpus]\nrepeat_share = 0.5\nn_recorded = 3\nzipf_exponent = 1.5\n"
    )
    (tmp_path / "s.toml").write_text(
        '[sweep]\nkind = "train"\nbase = "base.toml"\nseeds = [0]\n'
        '[grid]\n"corpus.train_shifts" = [[1], [1, 2], [1, 2, 3]]\n[dynamics]\nn = 4\nheldout = [20]\n'
    )
    import icl_circuits.lab.train as lt

    real, trained = lt.train, []

    def flaky(cfg, out, **kw):
        trained.append(Path(out).name)
        if len(trained) == 2:
            raise RuntimeError("worker died")
        return real(cfg, out, **kw)

    out = tmp_path / "out"
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(lt, "train", flaky)
        first = sw.run_sweep(tmp_path / "s.toml", out, engine="local", threads=1, progress=False)
        ids = [r["cell_id"] for r in first.rows]
        assert [r["status"] for r in first.rows] == ["ok", "error", "ok"]
        assert "worker died" in first.rows[1]["error"]
        assert figures.read_cells(out)[1]["cell"] == ids[2]  # the failed cell is left out of the figures
        rerun = sw.run_sweep(tmp_path / "s.toml", out, engine="local", threads=1, progress=False)
    finally:
        torch.set_num_threads(before)
    assert [r["status"] for r in rerun.rows] == ["ok"] * 3
    assert trained[3:] == [ids[1]] and rerun.computed == (ids[1],)  # only the failed cell was trained again
    cells = figures.read_cells(out)
    assert [c["cell"] for c in cells] == ids and [c["overrides"]["corpus.train_shifts"] for c in cells] == [
        [1], [1, 2], [1, 2, 3]]  # fmt: skip
    dyn = json.loads((out / sw.CELLS_DIR / ids[0] / "dynamics.json").read_text())
    assert dyn["steps"] == [0, 4] and dyn["settings"]["heldout_shifts"] == [20]
    assert cells[0]["dynamics"] == dyn
    assert {"bound-unseen", "recorded-rare", "rule-heldout"} <= set(dyn["families"])

    picture, text = figures.record_vs_circuit(out)
    assert picture.startswith("<svg") and picture.count("<rect") > 3 * 4  # a bar per family and cell
    assert text.count("\n") == 3 + 1 and "3 shifts" in text
    picture, text = figures.task_diversity(out)
    assert "<polyline" in picture and "held-out shifts [20]" in picture
