"""Run a lab sweep file's grid sequentially: ``train`` + ``run_dynamics`` per cell (until ``icl-circuits sweep``).

    python -m analyses.lab.grid analyses/lab/data_knobs.sweep.toml --out out/lab/data_knobs [--n 48]

A sweep file (the format ``icl-circuits sweep`` reads)::

    [sweep]
    kind = "train"
    base = "phase_change.toml"     # a LabConfig file, relative to the sweep file
    seeds = [0]
    cpus_per_task = 1
    [grid]                         # cartesian product of dotted LabConfig-key overrides
    "corpus.repeat_share" = [0.1, 0.5, 0.9]

``[sweep] heldout_shifts`` (optional) fixes the ``rule-heldout`` shifts of every cell's dynamics (default: the
three smallest shifts that cell did not train on). Each cell trains into ``OUT/<cell>/`` and writes
``dynamics.json`` + ``dynamics.html`` there; a cell whose ``dynamics.json`` exists is not recomputed, an
interrupted one resumes from its last checkpoint, and a cell that raises is recorded with its error while the
rest go on. One row per cell (overrides, seed, events, wall times, status) goes to ``OUT/cells.jsonl``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
import traceback
from pathlib import Path
from typing import Any

from icl_circuits.errors import InputError
from icl_circuits.io import atomic_write_text
from icl_circuits.lab.config import LabConfig, load_config, read_table


def read_sweep(path: str | Path) -> tuple[LabConfig, list[int], list[dict[str, Any]], dict[str, Any]]:
    """``(base config, seeds, cells, [sweep] table)``: cells are the grid's cartesian product of overrides.

    ``[sweep] overrides`` (optional) is applied to the base before the grid (a sweep's shared settings).
    """
    path = Path(path)
    table = read_table(path)
    sweep, grid = table.get("sweep"), table.get("grid", {})
    if not isinstance(sweep, dict) or sweep.get("kind") != "train" or "base" not in sweep:
        raise InputError(f"{str(path)!r}: needs a [sweep] table with kind = \"train\" and base = FILE")
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise InputError(f"{str(path)!r}: [grid] must map each setting to a non-empty list of values")
    base = load_config(path.parent / sweep["base"]).with_overrides(sweep.get("overrides", {}))
    keys = list(grid)
    cells = [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]
    for cell in cells:
        base.with_overrides(cell)  # every cell is checked before anything runs
    return base, [int(s) for s in sweep.get("seeds", [base.seed])], cells, sweep


def cell_name(overrides: dict[str, Any], seed: int) -> str:
    """A folder name for one cell: ``repeat_share=0.5,seed=0`` (``corpus.`` dropped, list values joined by ``-``)."""
    def fmt(v: Any) -> str:
        return "-".join(map(str, v)) if isinstance(v, list) else str(v)

    parts = [f"{k.removeprefix('corpus.')}={fmt(v)}" for k, v in overrides.items()]
    return ",".join([*parts, f"seed={seed}"])


def run_grid(path: str | Path, out: str | Path, *, n: int = 48, threads: int = 1) -> list[dict[str, Any]]:
    """Train and measure every cell of the sweep file ``path`` under ``out``; returns the cell rows."""
    from dataclasses import replace

    from icl_circuits.lab.dynamics import Dynamics, run_dynamics, write_dynamics
    from icl_circuits.lab.train import CONFIG_FILE, list_checkpoints, train

    base, seeds, cells, sweep = read_sweep(path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for overrides, seed in itertools.product(cells, seeds):
        cfg = replace(base.with_overrides(overrides), seed=seed)
        run_dir = out / cell_name(overrides, seed)
        row: dict[str, Any] = {"cell": run_dir.name, "overrides": overrides, "seed": seed}
        dyn_path = run_dir / "dynamics.json"
        try:
            if not dyn_path.is_file():
                t0 = time.time()
                resume = (run_dir / CONFIG_FILE).is_file() and bool(list_checkpoints(run_dir))
                train(cfg, run_dir, threads=threads, progress=False, resume=resume)
                t1 = time.time()
                heldout = sweep.get("heldout_shifts")
                dyn: Dynamics = run_dynamics(run_dir, n=n, heldout=tuple(heldout) if heldout else None,
                                             progress=False)  # fmt: skip
                write_dynamics(dyn, run_dir)
                row.update(train_s=round(t1 - t0, 1), dynamics_s=round(time.time() - t1, 1))
            saved = json.loads(dyn_path.read_text())
            row.update(status="done", events=saved["events"], reading=saved["reading"])
        except Exception as e:  # noqa: BLE001 - a failing cell is recorded; the rest go on
            row.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        print(f"{row['cell']}: {row['status']} {row.get('train_s', '')} {row.get('reading', row.get('error'))}",
              flush=True)
        rows.append(row)
        atomic_write_text(out / "cells.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=48, help="prompts per family per checkpoint")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    rows = run_grid(args.sweep, args.out, n=args.n, threads=args.threads)
    return 0 if all(r["status"] == "done" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
