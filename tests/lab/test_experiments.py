"""The shipped lab experiments: sweep files that parse into valid cells, the sequential grid runner (a failing
cell recorded, a rerun recomputes nothing finished), and the README figures built from run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from analyses.lab import figures, grid
from icl_circuits import InputError
from icl_circuits.lab.config import load_config, read_table

pytestmark = pytest.mark.fixture

LAB = Path(__file__).resolve().parents[2] / "analyses" / "lab"


@pytest.mark.unit
def test_shipped_sweep_files_expand_to_checked_cells():
    files = sorted(LAB.glob("*.sweep.toml"))
    assert {p.name for p in files} >= {"record_vs_circuit.sweep.toml", "task_diversity.sweep.toml"}
    for path in files:
        base, seeds, cells, sweep = grid.read_sweep(path)
        assert base == load_config(LAB / sweep["base"]) and seeds == [0] and sweep["kind"] == "train"
        table = read_table(path)["grid"]
        assert len(cells) == math.prod(len(v) for v in table.values())
        assert len({grid.cell_name(c, 0) for c in cells}) == len(cells)  # one folder per cell
        for c in cells:  # fixed held-out shifts are never trained on
            trained = c.get("corpus.train_shifts", base.corpus.train_shifts)
            assert not set(sweep.get("heldout_shifts", [])) & set(trained)


@pytest.mark.unit
def test_bad_sweep_files_are_refused(tmp_path):
    (tmp_path / "base.toml").write_text("steps = 4\n")
    head = '[sweep]\nkind = "train"\nbase = "base.toml"\n[grid]\n'
    for text, match in (("[grid]\nsteps = [1]\n", "kind"), (head + "steps = 3\n", "non-empty list"),
                        (head + "stesp = [3]\n", "did you mean"), (head + "steps = [0]\n", "steps must be")):
        (tmp_path / "s.toml").write_text(text)
        with pytest.raises(InputError, match=match):
            grid.read_sweep(tmp_path / "s.toml")


def test_grid_runs_cells_records_a_failure_and_reruns_only_what_is_missing(tmp_path, monkeypatch):
    """Tiny cells train and are measured; a cell whose training raises is recorded and the next goes on; the
    rerun trains only the failed cell; the figures read every finished cell."""
    (tmp_path / "base.toml").write_text(
        'name = "t"\nn_layer = 2\nn_head = 2\nn_embd = 16\nn_inner = 16\nsteps = 4\nbatch_size = 4\nwarmup = 1\n'
        "checkpoint_every = 4\n[corpus]\nrepeat_share = 0.5\nn_recorded = 3\nzipf_exponent = 1.5\n"
    )
    (tmp_path / "s.toml").write_text(
        '[sweep]\nkind = "train"\nbase = "base.toml"\nseeds = [0]\nheldout_shifts = [20]\n'
        '[grid]\n"corpus.train_shifts" = [[1], [1, 2], [1, 2, 3]]\n'
    )
    import icl_circuits.lab.train as lt

    real, trained = lt.train, []

    def flaky(cfg, out, **kw):
        trained.append(Path(out).name)
        if len(trained) == 2:
            raise RuntimeError("worker died")
        return real(cfg, out, **kw)

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(lt, "train", flaky)
        rows = grid.run_grid(tmp_path / "s.toml", tmp_path / "out", n=4)
        assert [r["status"] for r in rows] == ["done", "error", "done"]
        assert "worker died" in rows[1]["error"]
        rerun = grid.run_grid(tmp_path / "s.toml", tmp_path / "out", n=4)
    finally:
        torch.set_num_threads(before)
    assert [r["status"] for r in rerun] == ["done"] * 3
    assert trained[3:] == [rows[1]["cell"]]  # only the failed cell was trained again
    lines = (tmp_path / "out" / "cells.jsonl").read_text().splitlines()
    assert [json.loads(x)["cell"] for x in lines] == [r["cell"] for r in rows]
    dyn = json.loads((tmp_path / "out" / rows[0]["cell"] / "dynamics.json").read_text())
    assert dyn["steps"] == [0, 4] and dyn["settings"]["heldout_shifts"] == [20]
    assert {"bound-unseen", "recorded-rare", "rule-heldout"} <= set(dyn["families"])

    picture, text = figures.record_vs_circuit(tmp_path / "out")
    assert picture.startswith("<svg") and picture.count("<rect") > 3 * 4  # a bar per family and cell
    assert text.count("\n") == 3 + 1 and "3 shifts" in text
    picture, text = figures.task_diversity(tmp_path / "out")
    assert "<polyline" in picture and "held-out shifts [20]" in picture
