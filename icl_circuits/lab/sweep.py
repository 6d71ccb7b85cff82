"""Sweeps: a grid of training runs (or of commands) as Ray tasks or one after another, resumable, one table.

A sweep file (TOML or JSON) names the cells::

    [sweep]
    kind = "train"                   # or "command"
    base = "phase_change.toml"       # train: a lab config, relative to this file
    seeds = [0, 1]
    cpus_per_task = 1                # Ray resources per cell (also the cell's torch threads)
    gpus_per_task = 0
    [grid]                           # the cartesian product of these overrides (dotted LabConfig keys)
    "corpus.repeat_share" = [0.2, 0.8]
    steps = [200]
    [dynamics]                       # train: the settings of run_dynamics (optional)
    n = 64
    heldout = [20, 21, 22]           # the rule-heldout shifts of every cell (default: per cell, the 3 smallest
                                     # untrained ones); a cell that trains on one of them is refused

A ``train`` cell is the base config with one combination of overrides and one seed (the config's ``seed``, also
the seed of its dynamics measurement): it trains into
``OUT/cells/<cell_id>/`` (:func:`icl_circuits.lab.train.train`) and measures every checkpoint there
(:func:`icl_circuits.lab.dynamics.run_dynamics`, ``dynamics.json`` + ``dynamics.html``). A ``command`` cell is
one command line of ``icl-circuits`` run in process::

    [sweep]
    kind = "command"
    commands = ["evaluate --shots 0,4", "analyze shots-and-noise"]
    models = ["fixture:icl-tiny"]
    tasks = ["fixture-bound", "fixture-recorded0"]   # --task (or --tasks for analyze); none for head-scan
    seeds = [0]
    [grid]
    "--n" = [8, 16]                  # options added to every command

with ``--model M --seed S --out OUT/cells/<cell_id> --threads T`` added. ``cell_id`` is a slug and the
first 10 hex digits of the sha256 of what the cell computes (the full config, or the command line), so it is
stable across runs and changes when the cell does.

Fault tolerance: a cell that finished writes ``cell.json`` atomically as its very last step, and a cell with
that marker is never computed again; a cell that raises (or whose command exits non-zero) is recorded with its
error in ``cell_error.json`` and the others go on; it is computed again on the next run. A train cell killed
mid-run resumes from its last complete checkpoint (exact resume). ``OUT/results.csv`` (one row per cell:
status ``ok``/``error``/``pending``, error, seconds, seed, overrides, versions, headline numbers) is rewritten
atomically after every finished cell; ``OUT/summary.html`` and ``OUT/sweep.json`` (the grid, the cells and
the last run's counts and timings) at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from icl_circuits.errors import ICLCircuitsError, InputError
from icl_circuits.io import atomic_write_json, atomic_write_text, check_output_dir, versions
from icl_circuits.lab.config import LabConfig, _near, read_table
from icl_circuits.results import Result, series_colors

KINDS = ("train", "command")
ENGINES = ("ray", "local")
CELLS_DIR = "cells"
MARKER = "cell.json"
ERROR_FILE = "cell_error.json"
LOG_FILE = "output.log"
RESULTS_FILE = "results.csv"
SUMMARY_FILE = "summary.html"
SPEC_FILE = "sweep.json"
SWEEP_KEYS = ("kind", "base", "seeds", "cpus_per_task", "gpus_per_task", "commands", "models", "tasks")
TRAIN_ONLY = ("base",)
COMMAND_ONLY = ("commands", "models", "tasks")
TABLES = ("sweep", "grid", "dynamics")
DYNAMICS_DEFAULTS: dict[str, Any] = {"n": 64, "seq_len": 20, "threshold": 0.4, "min_drop": 0.3}
#: ``[dynamics]`` keys without a default value: absent, run_dynamics chooses (and the cell id is as without them).
DYNAMICS_OPTIONAL = ("heldout",)
DYNAMICS_KEYS = (*DYNAMICS_DEFAULTS, *DYNAMICS_OPTIONAL)
#: The JSON file each command writes in its --out folder (``analyze NAME`` writes NAME with underscores).
COMMAND_JSON = {"evaluate": "evaluation.json", "head-scan": "head_scan.json", "fast-weights": "fast_weights.json",
                "attribute": "attribution.json"}  # fmt: skip
SEED_MAX = 2**32 - 1
RAY_MISSING = ("--engine ray needs Ray, which is not installed: pip install 'icl_circuits[sweep]' (ray>=2.60); "
               "--engine local runs the same grid one cell after another without it")  # fmt: skip


@dataclass(frozen=True)
class Commands:
    """How ``command`` cells run (given by :func:`icl_circuits.cli.sweep_commands`, so the lab does not import
    the command line): ``main(argv) -> exit code``, ``check(argv)`` raising an ``InputError`` for a command line
    the parser refuses (before any cell runs), and ``task_option(command)``: ``"--task"``, ``"--tasks"`` or
    ``None`` (a command without a task)."""

    main: Callable[[Sequence[str]], int]
    check: Callable[[Sequence[str]], None]
    task_option: Callable[[str], str | None]


@dataclass(frozen=True)
class Cell:
    """One cell of a sweep: what it computes and its resources.

    ``params``: the cell's coordinates for the table (its grid values, seed; model/task/command for a
    command cell). ``config``: a train cell's full LabConfig (as a dict); ``argv``: a command cell's command
    line without ``--out``.
    """

    cell_id: str
    kind: str
    seed: int
    params: dict[str, Any]
    config: dict[str, Any] | None = None
    dynamics: dict[str, Any] | None = None
    argv: tuple[str, ...] = ()
    cpus: float = 1.0
    gpus: float = 0.0

    @property
    def threads(self) -> int:
        """Torch threads of the cell: its CPUs, at least 1."""
        return max(1, int(self.cpus))


@dataclass(frozen=True)
class SweepSpec:
    """A checked sweep file (see the module doc); :meth:`cells` lists the grid."""

    path: Path
    kind: str
    seeds: tuple[int, ...]
    grid: dict[str, list[Any]]
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    base: Path | None = None
    base_config: LabConfig | None = None
    dynamics: dict[str, Any] = field(default_factory=dict)
    commands: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ()

    def combos(self) -> list[dict[str, Any]]:
        """The cartesian product of the grid, in file order (one empty combination for an absent grid)."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def cells(self, commands: Commands | None = None) -> list[Cell]:
        """Every cell, in order: grid combination x seed (x command x model x task for ``command``).

        Raises:
            InputError: a combination the lab config refuses (naming it), or a command line the parser refuses
                (``commands`` given), or two cells that compute the same thing.
        """
        out: list[Cell] = []
        for combo in self.combos():
            for seed in self.seeds:
                out += self._train_cells(combo, seed) if self.kind == "train" else self._command_cells(combo, seed,
                                                                                                      commands)
        seen: dict[str, Cell] = {}
        for c in out:
            if c.cell_id in seen:
                raise InputError(f"sweep {str(self.path)!r}: cells {seen[c.cell_id].params} and {c.params} compute "
                                 "the same thing (a repeated grid value?)")  # fmt: skip
            seen[c.cell_id] = c
        return out

    def _train_cells(self, combo: dict[str, Any], seed: int) -> list[Cell]:
        assert self.base_config is not None
        try:
            cfg = self.base_config.with_overrides({**combo, "seed": seed})
        except InputError as e:
            raise InputError(f"sweep {str(self.path)!r}: grid cell {combo} (seed {seed}): {e}") from None
        trained = set(self.dynamics.get("heldout") or ()) & set(cfg.corpus.train_shifts)
        if trained:
            raise InputError(f"sweep {str(self.path)!r}: grid cell {combo} (seed {seed}) trains on the held-out "
                             f"shift(s) {sorted(trained)} of [dynamics] heldout")  # fmt: skip
        what = {"kind": "train", "config": cfg.to_dict(), "dynamics": self.dynamics}
        return [Cell(cell_id(f"s{seed}", what), "train", seed, {**combo, "seed": seed}, cfg.to_dict(),
                     dict(self.dynamics), (), self.cpus_per_task, self.gpus_per_task)]  # fmt: skip

    def _command_cells(self, combo: dict[str, Any], seed: int, commands: Commands | None) -> list[Cell]:
        out = []
        for command in self.commands:
            words = shlex.split(command)
            option = commands.task_option(words[0]) if commands is not None else "--task"
            for model in self.models:
                for task in self.tasks if option is not None and self.tasks else [None]:
                    argv = [*words, "--model", model, "--seed", str(seed)]
                    if task is not None and option is not None:
                        argv += [option, task]
                    for key, value in combo.items():
                        argv += _option_words(key, value)
                    if "--threads" not in argv:
                        argv += ["--threads", str(max(1, int(self.cpus_per_task)))]
                    if commands is not None:
                        try:
                            commands.check([*argv, "--out", "CELL_DIR"])
                        except InputError as e:
                            raise InputError(f"sweep {str(self.path)!r}: command {shlex.join(argv)!r}: {e}") from None
                    params = {**combo, "seed": seed, "command": command, "model": model, "task": task}
                    slug = f"{words[0]}-{words[1] if words[0] == 'analyze' and len(words) > 1 else ''}-{model}-s{seed}"
                    out.append(Cell(cell_id(slug, {"kind": "command", "argv": argv}), "command", seed, params, None,
                                    None, tuple(argv), self.cpus_per_task, self.gpus_per_task))  # fmt: skip
        return out


def _option_words(key: str, value: Any) -> list[str]:
    """``"--n", 8`` -> ``["--n", "8"]``; ``true`` -> the flag alone; ``false`` -> nothing; a list -> comma-joined."""
    if value is True:
        return [key]
    if value is False:
        return []
    if isinstance(value, list):
        return [key, ",".join(str(v) for v in value)]
    return [key, str(value)]


def cell_id(slug: str, what: dict[str, Any]) -> str:
    """``slug-<10 hex>``: the slug made file-name safe (<= 40 characters) and the sha256 of ``what`` (sorted JSON)."""
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:10]
    safe = re.sub(r"[^A-Za-z0-9._]+", "-", slug).strip("-.")[:40]
    return f"{safe}-{digest}" if safe else digest


# ---------------------------------------------------------------- reading a sweep file


def _bad(path: Path, msg: str) -> InputError:
    return InputError(f"sweep {str(path)!r}: {msg}")


def _number(path: Path, key: str, value: Any, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0 or (
        positive and value == 0
    ):
        raise _bad(path, f"[sweep] {key} must be a number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _strings(path: Path, key: str, value: Any, *, required: bool) -> tuple[str, ...]:
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise _bad(path, f"[sweep] {key} must be a non-empty list of strings, got {value!r}")
    if len(set(value)) < len(value):
        raise _bad(path, f"[sweep] {key} lists a value twice: {value!r}")
    return tuple(v.strip() for v in value)


def load_sweep(path: str | os.PathLike[str], *, seed: int | None = None) -> SweepSpec:
    """Read and check a sweep file (every key, the base config, every cell's config); ``seed`` replaces ``seeds``.

    Raises:
        InputError: a missing or unparsable file, an unknown table or key (with the closest known one), an empty
            ``[grid]`` or grid axis, bad seeds or resources, a missing base config, an override the lab config
            refuses, keys of the other kind.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"sweep file {str(path)!r} not found")
    data = read_table(p)
    for table in data:
        if table not in TABLES:
            raise _bad(p, f"unknown table [{table}]{_near(table, list(TABLES))}; known: {', '.join(TABLES)}")
        if not isinstance(data[table], dict):
            raise _bad(p, f"[{table}] must be a table")
    sw: dict[str, Any] = data.get("sweep", {})
    if "sweep" not in data:
        raise _bad(p, "no [sweep] table (kind, seeds, ...)")
    for key in sw:
        if key == "heldout_shifts":  # the key of analyses/lab/grid.py, the runner this module replaced
            raise _bad(p, "[sweep] heldout_shifts is now [dynamics] heldout (the held-out shifts of every cell)")
        if key not in SWEEP_KEYS:
            raise _bad(p, f"unknown [sweep] key {key!r}{_near(key, list(SWEEP_KEYS))}; known: {', '.join(SWEEP_KEYS)}")
    kind = sw.get("kind", "train")
    if kind not in KINDS:
        raise _bad(p, f"[sweep] kind must be one of {KINDS}, got {kind!r}")
    wrong = [k for k in (COMMAND_ONLY if kind == "train" else TRAIN_ONLY) if k in sw]
    if wrong:
        raise _bad(p, f"[sweep] {', '.join(wrong)} {'is' if len(wrong) == 1 else 'are'} not used by kind {kind!r}")
    seeds_raw = [seed] if seed is not None else sw.get("seeds", [0])
    if (not isinstance(seeds_raw, list) or not seeds_raw
            or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= SEED_MAX for s in seeds_raw)):
        raise _bad(p, f"[sweep] seeds must be a non-empty list of integers in 0..{SEED_MAX}, got {seeds_raw!r}")
    if len(set(seeds_raw)) < len(seeds_raw):
        raise _bad(p, f"[sweep] seeds lists a seed twice: {seeds_raw!r}")
    cpus = _number(p, "cpus_per_task", sw.get("cpus_per_task", 1), positive=True)
    gpus = _number(p, "gpus_per_task", sw.get("gpus_per_task", 0), positive=False)
    grid = _read_grid(p, data, kind)
    common: dict[str, Any] = {"path": p, "kind": kind, "seeds": tuple(seeds_raw), "grid": grid,
                              "cpus_per_task": cpus, "gpus_per_task": gpus}  # fmt: skip
    if kind == "train":
        if "base" not in sw or not isinstance(sw["base"], str) or not sw["base"].strip():
            raise _bad(p, "[sweep] base must name the lab config file the grid overrides (kind 'train')")
        base = (p.parent / Path(sw["base"]).expanduser()).resolve()
        if not base.is_file():
            raise _bad(p, f"base config {sw['base']!r} not found (looked for {str(base)!r})")
        base_config = LabConfig.from_dict(read_table(base), where=f"config {str(base)!r}")
        spec = SweepSpec(**common, base=base, base_config=base_config, dynamics=_read_dynamics(p, data))
    else:
        if "dynamics" in data:
            raise _bad(p, "[dynamics] is not used by kind 'command'")
        commands = _strings(p, "commands", sw.get("commands"), required=True)
        for c in commands:
            try:
                shlex.split(c)
            except ValueError as e:
                raise _bad(p, f"[sweep] commands: {c!r} does not split into words ({e})") from None
            if any(w == "--out" or w.startswith("--out=") for w in shlex.split(c)):
                raise _bad(p, f"[sweep] commands: {c!r} gives --out; each cell writes in its own folder")
        spec = SweepSpec(**common, commands=commands, models=_strings(p, "models", sw.get("models"), required=True),
                         tasks=_strings(p, "tasks", sw.get("tasks"), required=False))  # fmt: skip
    spec.cells()  # every cell's config is checked now, before anything runs
    return spec


def _read_grid(p: Path, data: dict[str, Any], kind: str) -> dict[str, list[Any]]:
    if "grid" not in data:
        return {}
    grid = data["grid"]
    if not grid:
        raise _bad(p, "[grid] is empty: list values to sweep (key = [v1, v2]), or drop [grid] to run the base per seed")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise _bad(p, f"[grid] {key!r} must be a list of values, got {values!r} (one value: [{values!r}])")
        if not values:
            raise _bad(p, f"[grid] {key!r} is empty: no cell would run")
        if kind == "command" and not key.startswith("--"):
            raise _bad(p, f"[grid] {key!r}: kind 'command' sweeps command options, written --NAME")
        if kind == "train" and key.startswith("train."):
            raise _bad(p, f"[grid] {key!r}: lab settings are top level; write {key[len('train.'):]!r}")
    return dict(grid)


def _read_dynamics(p: Path, data: dict[str, Any]) -> dict[str, Any]:
    raw = data.get("dynamics", {})
    for key in raw:
        if key not in DYNAMICS_KEYS:
            raise _bad(p, f"unknown [dynamics] key {key!r}{_near(key, list(DYNAMICS_KEYS))}; "
                          f"known: {', '.join(DYNAMICS_KEYS)}")  # fmt: skip
    out = {**DYNAMICS_DEFAULTS, **raw}
    for key, low in (("n", 1), ("seq_len", 2)):
        if isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low:
            raise _bad(p, f"[dynamics] {key} must be an integer >= {low}, got {out[key]!r}")
    for key in ("threshold", "min_drop"):
        if isinstance(out[key], bool) or not isinstance(out[key], (int, float)) or not 0 <= out[key] < float("inf"):
            raise _bad(p, f"[dynamics] {key} must be a number >= 0, got {out[key]!r}")
    if out["threshold"] > 1:
        raise _bad(p, f"[dynamics] threshold must be in [0, 1], got {out['threshold']!r}")
    if "heldout" in out:
        held = out["heldout"]
        if (not isinstance(held, list) or not held
                or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 25 for s in held)):
            raise _bad(p, f"[dynamics] heldout must be a non-empty list of shifts (integers in 1..25), got {held!r}")
        if len(set(held)) < len(held):
            raise _bad(p, f"[dynamics] heldout lists a shift twice: {held!r}")
    return out


# ---------------------------------------------------------------- running one cell (in a Ray worker or here)


def run_cell(cell: Cell, cell_dir: str, commands: Commands | None = None) -> dict[str, Any]:
    """Compute one cell in ``cell_dir`` and return its record; never raises for a failing cell (only
    ``KeyboardInterrupt``/``SystemExit`` pass). Output goes to ``cell_dir/output.log``.

    Record: ``cell_id, status ("ok" | "error"), error, seconds, threads, headline {name: number | str},
    versions, host, pid, package (where icl_circuits was imported from), finished_at``; written atomically as
    ``cell_dir/cell.json`` (the marker, last) when ok, else as ``cell_dir/cell_error.json`` (with the traceback).
    """
    import icl_circuits

    start = time.perf_counter()
    folder = Path(cell_dir)
    record: dict[str, Any] = {"cell_id": cell.cell_id, "kind": cell.kind, "params": cell.params, "status": "ok",
                              "error": None, "threads": cell.threads, "headline": {}, "versions": versions(),
                              "host": platform.node(), "pid": os.getpid(),
                              "package": str(Path(icl_circuits.__file__).parent)}  # fmt: skip
    tb = None
    try:
        check_output_dir(folder).mkdir(parents=True, exist_ok=True)  # an OutputError names a bad folder
        (folder / MARKER).unlink(missing_ok=True)
        with open(folder / LOG_FILE, "a", encoding="utf-8") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):  # fmt: skip
            print(f"--- cell {cell.cell_id} started {time.strftime('%Y-%m-%d %H:%M:%S')} (pid {os.getpid()})")
            if cell.kind == "train":
                record["headline"], record["resumed_from"] = _run_train_cell(cell, folder)
            else:
                record["headline"] = _run_command_cell(cell, folder, commands)
    except Exception as e:  # noqa: BLE001 - a failing cell is recorded, the sweep goes on
        kind = "" if isinstance(e, ICLCircuitsError) else f"{type(e).__name__}: "
        record["status"], record["error"] = "error", f"{kind}{' '.join(str(e).split())}"[:500] or type(e).__name__
        tb = traceback.format_exc()
    record["seconds"] = round(time.perf_counter() - start, 2)
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        if record["status"] == "ok":
            (folder / ERROR_FILE).unlink(missing_ok=True)
            atomic_write_json(folder / MARKER, record)  # last: a cell with this file is finished
        else:
            atomic_write_json(folder / ERROR_FILE, {**record, "traceback": tb})
    except OSError as e:  # e.g. the cell folder is a file: the record still reaches the table
        record["note"] = f"record not written in the cell folder: {e}"
    return record


def _run_train_cell(cell: Cell, folder: Path) -> tuple[dict[str, Any], int | None]:
    """Train (resuming a killed run of this cell from its last checkpoint) and measure the dynamics."""
    import torch

    from icl_circuits.lab.dynamics import run_dynamics, write_dynamics
    from icl_circuits.lab.train import CONFIG_FILE, list_checkpoints, read_run_config, train

    assert cell.config is not None and cell.dynamics is not None
    cfg = LabConfig.from_dict(cell.config, where=f"cell {cell.cell_id}")
    resume = False
    if (folder / CONFIG_FILE).is_file():
        try:
            same = read_run_config(folder) == cfg
        except (InputError, ValueError, KeyError):
            same = False
        if same and list_checkpoints(folder):
            resume = True
        else:  # a run of another config, or killed before its first checkpoint: start again
            for child in folder.iterdir():
                if child.name != LOG_FILE:
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
    before = torch.get_num_threads()
    try:
        run = train(cfg, folder, resume=resume, threads=cell.threads, progress=False)
        d = cell.dynamics
        dyn = run_dynamics(folder, n=d["n"], seed=cell.seed, seq_len=d["seq_len"], threshold=d["threshold"],
                           min_drop=d["min_drop"], heldout=tuple(d["heldout"]) if "heldout" in d else None,
                           progress=False)  # fmt: skip
        write_dynamics(dyn, folder)
    finally:
        torch.set_num_threads(before)
    last = [r["loss"] for r in run.log[-10:]]
    return {**train_headline(dyn.events()), "final_loss": sum(last) / len(last) if last else None}, run.resumed_from


def train_headline(events: dict[str, Any]) -> dict[str, Any]:
    """The table's numbers of a train cell, from :meth:`Dynamics.events`: the scalars, and
    ``acc_final_<family>`` / ``acc_max_<family>`` from the accuracy dictionaries."""
    out = {k: v for k, v in events.items() if not isinstance(v, dict)}
    for fam, v in events.get("final_accuracy", {}).items():
        out[f"acc_final_{fam}"] = v
    for fam, v in events.get("max_accuracy", {}).items():
        out[f"acc_max_{fam}"] = v
    return out


def _run_command_cell(cell: Cell, folder: Path, commands: Commands | None) -> dict[str, Any]:
    if commands is None:
        raise InputError("command cells need the command line's runner: icl_circuits.cli.sweep_commands()")
    code = commands.main([*cell.argv, "--out", str(folder)])
    if code != 0:
        sys.stdout.flush()  # the cell's log (stdout and stderr are redirected to it)
        sys.stderr.flush()
        lines = [x for x in (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines() if x]
        errors = [x for x in lines if ": error: " in x or "internal error" in x]
        raise InputError(f"exit code {code}: {(errors or lines or ['no output'])[-1]}")
    return command_headline(cell.argv, folder)


def command_headline(argv: Sequence[str], folder: Path) -> dict[str, Any]:
    """The table's numbers of a command cell, from the JSON the command wrote: its ``findings`` (scalars and
    the reading); else an evaluation's ``accuracy@K`` / ``logit_diff@K`` per number of shots, or a head scan's
    in-context score and induction heads; ``{}`` for the others (fast-weights, attribute: their numbers stay in
    the cell folder)."""
    name = (argv[1].replace("-", "_") + ".json") if argv[0] == "analyze" else COMMAND_JSON.get(argv[0], "")
    path = folder / name
    if not name or not path.is_file():
        return {}
    doc = json.loads(path.read_text(encoding="utf-8"))
    found = doc.get("findings")
    if isinstance(found, dict):
        return {k: v for k, v in found.items() if v is None or isinstance(v, (int, float, str))}
    out: dict[str, Any] = {}
    if isinstance(doc.get("in_context"), dict):  # head-scan: the in-context score and the induction heads
        out["in_context_score"] = doc["in_context"].get("score")
    if isinstance(doc.get("induction_heads"), list):
        out["induction_heads"] = " ".join(f"L{h[0]}H{h[1]}" for h in doc["induction_heads"]) or None
    for row in doc.get("rows", []):
        if isinstance(row, dict) and "shots" in row:
            for key in ("accuracy", "logit_diff"):
                if key in row:
                    out[f"{key}@{row['shots']}"] = row[key]
    return out


# ---------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepResult(Result):
    """A sweep's table (one row per cell) and what this run did: ``computed`` (cells run now), ``reused``
    (finished before, not recomputed)."""

    out_dir: str
    kind: str
    engine: str
    grid_keys: tuple[str, ...]
    rows: tuple[dict[str, Any], ...]
    computed: tuple[str, ...]
    reused: tuple[str, ...]
    wall_time_s: float
    engine_start_s: float | None = None
    notes: tuple[str, ...] = ()

    title = "Sweep"

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        """One row per cell (the columns of ``results.csv``)."""
        import pandas as pd

        return pd.DataFrame([_flat_row(r) for r in self.rows])

    def counts(self) -> dict[str, int]:
        return {s: sum(r["status"] == s for r in self.rows) for s in ("ok", "error", "pending")}

    def findings(self) -> dict[str, Any]:
        c = self.counts()
        return {"cells": len(self.rows), **c, "computed": len(self.computed), "reused": len(self.reused),
                "wall_time_s": self.wall_time_s, "engine_start_s": self.engine_start_s,
                "reading": self.reading()}  # fmt: skip

    def reading(self) -> str:
        c = self.counts()
        text = (f"{len(self.rows)} cells ({self.kind}, engine {self.engine}): {c['ok']} ok, {c['error']} error, "
                f"{c['pending']} pending; {len(self.computed)} computed in this run, {len(self.reused)} reused "
                f"(finished before, not recomputed), {self.wall_time_s:.0f} s.")  # fmt: skip
        failed = [r for r in self.rows if r["status"] == "error"]
        if failed:
            text += " Failed: " + "; ".join(f"{r['cell_id']}: {r['error']}" for r in failed[:3])
            text += f" (and {len(failed) - 3} more)." if len(failed) > 3 else "."
            text += " A rerun computes them again."
        return text + "".join(f" Note: {n}" for n in self.notes)

    def _labels(self) -> list[str]:
        return [" ".join(f"{k}={v}" for k, v in r["params"].items() if v is not None) or r["cell_id"]
                for r in self.rows]  # fmt: skip

    def figures(self) -> list[Any]:
        """Accuracy-like headline numbers (``acc*``, else every number) per cell, one trace per number; the same
        against each numeric grid axis (mean over the other cells); seconds per cell, by status."""
        import plotly.graph_objects as go

        labels = self._labels()
        figs = []
        numeric = sorted({k for r in self.rows for k, v in r.get("headline", {}).items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})  # fmt: skip
        shown = [k for k in numeric if k.startswith("acc")] or numeric
        if shown:
            colors = series_colors(shown)
            fig = go.Figure()
            for k in shown:
                fig.add_trace(go.Scatter(x=labels, y=[r.get("headline", {}).get(k) for r in self.rows],
                                         mode="markers", name=k, marker={"color": colors[k], "size": 9}))  # fmt: skip
            fig.update_layout(title="headline numbers per cell", xaxis_title="cell", yaxis_title="value")
            figs.append(fig)
            figs += [self._axis_figure(key, shown, colors) for key in self.grid_keys if self._numeric_axis(key)]
        status_colors = {"ok": "#54a24b", "error": "#e45756", "pending": "#bab0ac"}
        fig = go.Figure()
        for status, colour in status_colors.items():
            idx = [i for i, r in enumerate(self.rows) if r["status"] == status]
            if idx:
                fig.add_trace(go.Bar(x=[labels[i] for i in idx], y=[self.rows[i].get("seconds") or 0 for i in idx],
                                     name=status, marker={"color": colour}))  # fmt: skip
        fig.update_layout(title="seconds per cell, by status", xaxis_title="cell", yaxis_title="s")
        figs.append(fig)
        return figs

    def _numeric_axis(self, key: str) -> bool:
        """Whether grid axis ``key`` takes more than one number over the finished cells (a list-valued axis,
        such as ``corpus.train_shifts``, is not one)."""
        values = [r["params"].get(key) for r in self.rows if r["status"] == "ok"]
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) and len(set(values)) > 1

    def _axis_figure(self, key: str, shown: list[str], colors: dict[str, str]) -> Any:
        """``shown`` numbers against one numeric grid axis: the mean over the finished cells at each value (over
        seeds and the other axes), one trace per number."""
        import plotly.graph_objects as go

        ok = [r for r in self.rows if r["status"] == "ok"]
        xs = sorted({r["params"][key] for r in ok})
        fig = go.Figure()
        for k in shown:
            ys = []
            for x in xs:
                vals = [r["headline"][k] for r in ok if r["params"][key] == x
                        and isinstance(r["headline"].get(k), (int, float))]  # fmt: skip
                ys.append(sum(vals) / len(vals) if vals else None)
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=k, line={"color": colors[k]},
                                     marker={"color": colors[k]}))  # fmt: skip
        fig.update_layout(title=f"against {key} (mean over seeds and the other axes)", xaxis_title=key,
                          yaxis_title="value")  # fmt: skip
        return fig

    def sections(self) -> list[Any]:
        """The summary page: reading, the table, the figures, the errors."""
        import pandas as pd

        from icl_circuits.report import Section, figure_html, table_html

        out = [Section("Reading", table_html(pd.DataFrame([self.counts()])), self.reading()),
               Section("Cells", table_html(self.to_dataframe(), max_rows=1000))]  # fmt: skip
        out += [Section(f.layout.title.text or "figure", figure_html(f)) for f in self.figures()]
        errors = [{"cell_id": r["cell_id"], "error": r["error"], "cell folder": r["cell_dir"]} for r in self.rows
                  if r["status"] == "error"]  # fmt: skip
        if errors:
            out.append(Section("Errors", table_html(pd.DataFrame(errors)),
                               "Each failed cell's traceback is in its cell_error.json, its output in output.log."))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": self.out_dir, "kind": self.kind, "engine": self.engine, "grid_keys": list(self.grid_keys),
                "rows": [dict(r) for r in self.rows], "computed": list(self.computed), "reused": list(self.reused),
                "wall_time_s": self.wall_time_s, "engine_start_s": self.engine_start_s, "notes": list(self.notes),
                "findings": self.findings()}  # fmt: skip


def _flat_row(r: dict[str, Any]) -> dict[str, Any]:
    """A record as one table row: identity and status first, then the cell's coordinates, then the numbers."""
    row: dict[str, Any] = {"cell_id": r["cell_id"], "status": r["status"], "error": r.get("error"),
                           "seconds": r.get("seconds")}  # fmt: skip
    for k, v in r["params"].items():
        row[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
    for k, v in r.get("headline", {}).items():
        row[k] = v
    row["threads"] = r.get("threads")
    row["resumed_from"] = r.get("resumed_from")
    for k, v in (r.get("versions") or {}).items():
        row[f"version:{k}"] = v
    row["finished_at"] = r.get("finished_at")
    row["cell_dir"] = r.get("cell_dir")
    return row


def read_record(folder: Path, cell: Cell) -> dict[str, Any] | None:
    """The finished record of ``cell`` in ``folder`` (``cell.json``), else its last error record, else None."""
    for name in (MARKER, ERROR_FILE):
        try:
            rec = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and rec.get("cell_id") == cell.cell_id and rec.get("status") in ("ok", "error"):
            if (name == MARKER) == (rec["status"] == "ok"):
                return rec
    return None


def write_table(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """``out/results.csv``, atomically (one row per cell)."""
    import pandas as pd

    return atomic_write_text(out / RESULTS_FILE, pd.DataFrame([_flat_row(r) for r in rows]).to_csv(index=False))


def _import_ray() -> Any:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise InputError(RAY_MISSING) from None


def run_sweep(
    sweep: str | os.PathLike[str] | SweepSpec,
    out: str | os.PathLike[str],
    *,
    engine: str = "ray",
    address: str | None = None,
    num_cpus: int | None = None,
    seed: int | None = None,
    threads: int | None = None,
    commands: Commands | None = None,
    progress: bool = True,
) -> SweepResult:
    """Run every cell of ``sweep`` that has not finished yet, into ``out`` (see the module doc).

    Args:
        engine: ``"ray"`` (each cell a Ray task with ``cpus_per_task``/``gpus_per_task``; a local Ray instance
            is started unless Ray is already initialised or ``address`` names a cluster) or ``"local"`` (one cell
            after another in this process, no Ray).
        address: an existing Ray cluster (``ray.init(address=...)``); ``out`` must be a folder every node sees.
        num_cpus: CPUs of the local Ray instance (default: all).
        seed: run only this seed (replaces the file's ``seeds``).
        threads: torch threads per cell with ``engine="local"`` (default ``cpus_per_task``).
        commands: how ``command`` cells run (:func:`icl_circuits.cli.sweep_commands`; required for them).

    Raises:
        InputError: a bad sweep file (:func:`load_sweep`), an unknown engine, ``engine="ray"`` without Ray,
            ``command`` cells without ``commands``.
        OutputError: ``out`` cannot be written.
    """
    from tqdm.auto import tqdm

    if engine not in ENGINES:
        raise InputError(f"engine must be one of {ENGINES}, got {engine!r}")
    spec = sweep if isinstance(sweep, SweepSpec) else load_sweep(sweep, seed=seed)
    if spec.kind == "command" and commands is None:
        raise InputError("a 'command' sweep needs commands=icl_circuits.cli.sweep_commands() (or run icl-circuits "
                         "sweep)")  # fmt: skip
    cells = spec.cells(commands)
    if engine == "local" and threads is not None:
        cells = [_with_threads(c, threads) for c in cells]
    ray = _import_ray() if engine == "ray" else None
    if ray is not None and address is not None:
        check_address(address)  # before anything is written
    root = check_output_dir(out)
    cells_dir = root / CELLS_DIR
    folder = {c.cell_id: cells_dir / c.cell_id for c in cells}
    about = {"sweep_file": str(spec.path), "kind": spec.kind, "grid": spec.grid, "seeds": list(spec.seeds),
             "engine": engine, "cells": [{"cell_id": c.cell_id, "params": c.params} for c in cells]}
    atomic_write_json(root / SPEC_FILE, about)
    records: dict[str, dict[str, Any]] = {}
    for c in cells:
        rec = read_record(folder[c.cell_id], c)
        if rec is not None:
            records[c.cell_id] = rec
    reused = tuple(cid for cid, r in records.items() if r["status"] == "ok")
    todo = [c for c in cells if c.cell_id not in reused]
    notes: list[str] = []
    computed: list[str] = []
    start = time.perf_counter()

    def table() -> list[dict[str, Any]]:
        rows = []
        for c in cells:
            base = {"cell_id": c.cell_id, "kind": c.kind, "params": c.params, "status": "pending", "headline": {}}
            rows.append({**(records.get(c.cell_id) or base), "cell_dir": str(folder[c.cell_id])})
        return rows

    def done(rec: dict[str, Any]) -> None:
        records[rec["cell_id"]] = rec
        computed.append(rec["cell_id"])
        if rec.get("package") and rec["package"] != _package_dir():
            notes.append(f"cell {rec['cell_id']} ran icl_circuits from {rec['package']}, this process from "
                         f"{_package_dir()}")  # fmt: skip
        write_table(table(), root)
        bar.update(1)
        bar.set_postfix(ok=sum(r["status"] == "ok" for r in records.values()),
                        error=sum(r["status"] == "error" for r in records.values()))  # fmt: skip

    write_table(table(), root)
    bar = tqdm(total=len(cells), initial=len(reused), desc="cells", disable=not progress, dynamic_ncols=True)
    engine_start = None
    try:
        if ray is None:
            for c in todo:
                done(run_cell(c, str(folder[c.cell_id]), commands))
        elif todo:
            engine_start, started = _start_ray(ray, address, num_cpus)
            try:
                remote = ray.remote(run_cell)
                pending = {remote.options(num_cpus=c.cpus, num_gpus=c.gpus, max_retries=1).remote(
                    c, str(folder[c.cell_id]), commands): c for c in todo}  # fmt: skip
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    c = pending.pop(ready[0])
                    try:
                        rec = ray.get(ready[0])
                    except Exception as e:  # noqa: BLE001 - the worker died (killed, out of memory): record it
                        rec = {"cell_id": c.cell_id, "kind": c.kind, "params": c.params, "status": "error",
                               "error": f"Ray task failed: {type(e).__name__}: {' '.join(str(e).split())[:400]}",
                               "headline": {}, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                    done(rec)
            finally:
                if started:
                    ray.shutdown()
    finally:
        bar.close()
        write_table(table(), root)
    if any(c.gpus for c in cells) and engine == "local":
        notes.append("gpus_per_task is a Ray resource; the local engine ignores it")
    if spec.kind == "train" and any(c.gpus for c in cells):
        notes.append("training runs on the CPU: gpus_per_task reserves GPUs that train cells do not use")
    result = SweepResult(str(root), spec.kind, engine, tuple(spec.grid), tuple(table()), tuple(computed), reused,
                         round(time.perf_counter() - start, 1), engine_start, tuple(notes))  # fmt: skip
    atomic_write_json(root / SPEC_FILE, {**about, "last_run": result.findings(), "notes": list(notes)})
    write_summary(result, root)
    return result


def _with_threads(c: Cell, threads: int) -> Cell:
    from dataclasses import replace

    if c.kind == "command":  # the command line carries --threads (part of the id only through cpus_per_task)
        argv = list(c.argv)
        i = argv.index("--threads")
        argv[i + 1] = str(threads)
        return replace(c, cpus=float(threads), argv=tuple(argv))
    return replace(c, cpus=float(threads))


def _package_dir() -> str:
    import icl_circuits

    return str(Path(icl_circuits.__file__).parent)


def _start_ray(ray: Any, address: str | None, num_cpus: int | None) -> tuple[float, bool]:
    """Connect to ``address`` or start a local instance (no dashboard) unless one is running; seconds taken and
    whether we started it (then :func:`run_sweep` shuts it down)."""
    t = time.perf_counter()
    if ray.is_initialized():
        return 0.0, False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if address is not None:
        kw["address"] = address
    elif num_cpus is not None:
        kw["num_cpus"] = num_cpus
    try:
        ray.init(**kw)
    except ConnectionError as e:
        raise InputError(f"--address {address!r}: cannot connect to a Ray cluster ({e})") from None
    print(f"ray: {'connected to ' + address if address else 'local instance started'} in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)  # fmt: skip
    return round(time.perf_counter() - t, 1), True


def check_address(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``HOST:PORT`` (or ``ray://HOST:PORT``) nobody answers on within ``timeout_s``: ``ray.init``
    itself waits minutes for an unreachable cluster. ``"auto"`` (Ray's own lookup) is left to Ray.

    Raises:
        InputError: a malformed address, or no answer at it.
    """
    import socket

    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputError(f"--address {address!r}: give HOST:PORT (or ray://HOST:PORT, or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise InputError(f"--address {address!r}: no Ray cluster answers there ({e.strerror or e}); start one "
                         "with `ray start --head`, or leave --address out for a local instance") from None


def write_summary(result: SweepResult, out: str | os.PathLike[str]) -> Path:
    """``out/summary.html``: one offline page (reading, table, figures, errors)."""
    from icl_circuits.report import write_report

    prov = {"versions": versions(), "engine": result.engine, "computed": list(result.computed),
            "reused": list(result.reused)}  # fmt: skip
    return write_report(Path(out) / SUMMARY_FILE, f"Sweep {result.out_dir}", result.sections(), prov)
