"""Sweeps: a killed sweep loses no finished cell, a failing cell is recorded and the rest go on, a rerun computes
only the missing cells, the same grid on local Ray, and bad sweep files refused as project errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import icl_circuits.lab.sweep as sw
from icl_circuits import InputError
from icl_circuits.cli import main, sweep_commands

pytestmark = pytest.mark.fixture

REPO = Path(__file__).resolve().parents[2]
BASE = """name = "tiny"
n_layer = 2
n_head = 2
n_embd = 16
n_inner = 4
attn_only = true
steps = 8
batch_size = 8
warmup = 2
checkpoint_every = 4
[corpus]
repeat_share = 0.5
"""


def write_sweep(folder: Path, grid: str = '"corpus.repeat_share" = [0.2, 0.8]', seeds: str = "[0]",
                extra: str = "") -> Path:  # fmt: skip
    """A tiny train sweep (8 steps, 3 checkpoints, dynamics on 4 prompts) in ``folder``."""
    (folder / "base.toml").write_text(BASE)
    path = folder / "sweep.toml"
    path.write_text(f'[sweep]\nkind = "train"\nbase = "base.toml"\nseeds = {seeds}\ncpus_per_task = 1\n{extra}'
                    f"[grid]\n{grid}\n[dynamics]\nn = 4\n")  # fmt: skip
    return path


def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / sw.RESULTS_FILE)


def marker(out: Path, cid: str) -> Path:
    return out / sw.CELLS_DIR / cid / sw.MARKER


@pytest.fixture
def threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_killed_sweep_loses_no_finished_cell_and_the_rerun_computes_only_the_missing_ones(tmp_path, threads_back):
    path = write_sweep(tmp_path)
    ids = [c.cell_id for c in sw.load_sweep(path).cells()]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "icl_circuits.cli", "sweep", str(path), "--out", str(out),
                             "--engine", "local", "--threads", "1"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # kill -9 as soon as the table shows a finished cell
        if (out / sw.RESULTS_FILE).is_file() and (table(out)["status"] == "ok").any():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, f"the sweep was not killed mid-way: {proc.stderr.read().decode()[-800:]}"
    killed = table(out)
    assert list(killed["cell_id"]) == ids  # the table always lists every cell
    before = {cid for cid in ids if marker(out, cid).is_file()}
    assert set(killed.loc[killed["status"] == "ok", "cell_id"]) <= before and 1 <= len(before) < len(ids)
    assert set(killed.loc[killed["status"] != "ok", "status"]) <= {"pending"}
    stamps = {cid: (marker(out, cid).stat().st_mtime_ns, marker(out, cid).read_text()) for cid in before}

    again = sw.run_sweep(path, out, engine="local", threads=1, progress=False)
    assert set(again.computed) == set(ids) - before and set(again.reused) == before
    assert {cid: (marker(out, cid).stat().st_mtime_ns, marker(out, cid).read_text()) for cid in before} == stamps
    done = table(out)
    assert list(done["cell_id"]) == ids and (done["status"] == "ok").all()
    assert done["corpus.repeat_share"].tolist() == [0.2, 0.8] and done["seed"].tolist() == [0, 0]
    for cid, row in done.set_index("cell_id").iterrows():  # the headline numbers are the cell's dynamics.json
        events = json.loads((out / sw.CELLS_DIR / cid / "dynamics.json").read_text())["events"]
        assert row["ics_final"] == pytest.approx(events["ics_final"])
        assert row["acc_final_bound"] == pytest.approx(events["final_accuracy"]["bound"])
        assert row["version:torch"] == torch.__version__
    assert "2 cells" in again.reading() and (out / sw.SUMMARY_FILE).is_file()
    axis = next(f for f in again.figures() if f.layout.xaxis.title.text == "corpus.repeat_share")
    bound = next(t for t in axis.data if t.name == "acc_final_bound")
    assert list(bound.x) == [0.2, 0.8] and list(bound.y) == pytest.approx(done["acc_final_bound"].tolist())


def test_a_failing_cell_is_recorded_the_rest_go_on_and_a_rerun_computes_only_it(tmp_path, monkeypatch, threads_back):
    path = write_sweep(tmp_path, grid='"steps" = [8]', seeds="[0, 1]")
    out = tmp_path / "out"
    real = sw.LabConfig.from_dict

    def broken_for_seed_1(d, where="config"):  # the cell's training raises inside run_cell
        if d.get("seed") == 1 and where.startswith("cell "):
            raise RuntimeError("disk on fire")
        return real(d, where)

    monkeypatch.setattr(sw.LabConfig, "from_dict", staticmethod(broken_for_seed_1))
    first = sw.run_sweep(path, out, engine="local", threads=1, progress=False)
    monkeypatch.undo()
    rows = table(out).set_index("seed")
    assert rows.loc[0, "status"] == "ok" and rows.loc[1, "status"] == "error"
    assert rows.loc[1, "error"] == "RuntimeError: disk on fire"
    assert first.counts() == {"ok": 1, "error": 1, "pending": 0} and "disk on fire" in first.reading()
    bad_id = rows.loc[1, "cell_id"]
    assert "Traceback" in json.loads((out / sw.CELLS_DIR / bad_id / sw.ERROR_FILE).read_text())["traceback"]
    again = sw.run_sweep(path, out, engine="local", threads=1, progress=False)
    assert again.computed == (bad_id,) and again.reused == (rows.loc[0, "cell_id"],)
    assert (table(out)["status"] == "ok").all() and not (out / sw.CELLS_DIR / bad_id / sw.ERROR_FILE).exists()


def test_two_cells_on_local_ray_one_worker_raising_then_a_rerun_without_ray(tmp_path, threads_back, capsys):
    import ray

    path = write_sweep(tmp_path, grid='"corpus.repeat_share" = [0.2, 0.8]')
    cells = sw.load_sweep(path).cells()
    out = tmp_path / "out"
    (out / sw.CELLS_DIR).mkdir(parents=True)
    (out / sw.CELLS_DIR / cells[1].cell_id).write_text("in the way")  # the second cell's worker cannot write
    assert not ray.is_initialized()
    start = time.perf_counter()
    res = sw.run_sweep(path, out, engine="ray", num_cpus=2, progress=False)
    total = time.perf_counter() - start
    assert not ray.is_initialized()  # the instance it started is shut down
    ok, bad = (r for r in res.rows)
    assert ok["status"] == "ok" and bad["status"] == "error" and "is an existing file" in bad["error"]
    assert ok["pid"] != os.getpid() and bad["pid"] != os.getpid()  # both ran in Ray workers
    assert ok["package"] == str(Path(sw.__file__).parent.parent)  # ... on this checkout's code
    assert res.engine_start_s is not None and res.engine_start_s > 0
    with capsys.disabled():
        print(f"\nlocal Ray: started in {res.engine_start_s:.1f} s, two cells in {total:.1f} s "
              f"(cells {ok['seconds']:.1f} s / {bad['seconds']:.1f} s); load {os.getloadavg()[0]:.1f}")  # fmt: skip
    from safetensors.torch import load_file

    import icl_circuits.lab.train as lt

    direct = lt.train(sw.LabConfig.from_dict(cells[0].config), tmp_path / "direct", threads=1, progress=False)
    ray_w = load_file(str(out / sw.CELLS_DIR / cells[0].cell_id / "step-000008" / "model.safetensors"))
    here_w = load_file(str(direct.checkpoints[-1][1] / "model.safetensors"))
    assert all(torch.equal(ray_w[k], here_w[k]) for k in here_w)  # the Ray worker trained the same weights
    (out / sw.CELLS_DIR / cells[1].cell_id).unlink()
    again = sw.run_sweep(path, out, engine="local", threads=1, progress=False)
    assert again.computed == (cells[1].cell_id,) and again.reused == (cells[0].cell_id,)
    assert (table(out)["status"] == "ok").all() and len(table(out)) == 2


def test_command_cells_run_the_commands_in_process_and_record_a_failing_one(tmp_path, threads_back):
    (tmp_path / "broken-model").mkdir()  # exists (the spec check passes) but holds no model: load fails
    path = tmp_path / "cmd.toml"
    path.write_text('[sweep]\nkind = "command"\n'
                    'commands = ["evaluate --shots 0,2 --n 4", "head-scan --no-ablation --batch 2"]\n'
                    f'models = ["fixture:icl-tiny", "{tmp_path / "broken-model"}"]\ntasks = ["fixture-bound"]\n'
                    'seeds = [3]\n[grid]\n"--bos" = ["auto"]\n')  # fmt: skip
    with pytest.raises(InputError, match="needs commands="):
        sw.run_sweep(path, tmp_path / "o", engine="local")
    res = sw.run_sweep(path, tmp_path / "out", engine="local", commands=sweep_commands(), progress=False)
    assert res.counts() == {"ok": 2, "error": 2, "pending": 0} and len(res.to_dataframe()) == 4
    by = {(r["params"]["command"], r["params"]["model"]): r for r in res.rows}
    good = by[("evaluate --shots 0,2 --n 4", "fixture:icl-tiny")]
    ev = json.loads((Path(good["cell_dir"]) / "evaluation.json").read_text())
    assert good["status"] == "ok" and ev["seed"] == 3 and ev["n"] == 4 and ev["task"] == "fixture-bound"
    assert good["headline"] == {f"{k}@{r['shots']}": r[k] for r in ev["rows"] for k in ("accuracy", "logit_diff")}
    scan = by[("head-scan --no-ablation --batch 2", "fixture:icl-tiny")]
    assert scan["status"] == "ok" and scan["params"]["task"] is None  # head-scan takes no task
    doc = json.loads((Path(scan["cell_dir"]) / "head_scan.json").read_text())
    assert scan["headline"]["in_context_score"] == doc["in_context"]["score"] and doc["batch"] == 2
    for cmd in ("evaluate --shots 0,2 --n 4", "head-scan --no-ablation --batch 2"):
        broken = by[(cmd, str(tmp_path / "broken-model"))]
        assert broken["status"] == "error" and broken["error"].startswith("exit code 2: icl-circuits ")


@pytest.mark.unit
def test_bad_sweep_files_are_project_errors_naming_the_problem(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)
    cases = [
        ('[sweep]\nbase = "base.toml"\nseeds = [0]\ncpu_per_task = 1\n', "did you mean 'cpus_per_task'"),
        ('[sweep]\nbase = "base.toml"\n[grids]\nsteps = [2]\n', r"unknown table \[grids\] \(did you mean 'grid'"),
        ('[sweep]\nbase = "base.toml"\n[grid]\n', r"\[grid\] is empty"),
        ('[sweep]\nbase = "base.toml"\n[grid]\nsteps = []\n', "'steps' is empty: no cell"),
        ('[sweep]\nbase = "base.toml"\n[grid]\nsteps = 8\n', "must be a list of values"),
        ('[sweep]\nbase = "missing.toml"\n', "base config 'missing.toml' not found"),
        ('[sweep]\nkind = "train"\n', "base must name the lab config"),
        ('[sweep]\nbase = "base.toml"\n[grid]\n"corpus.bound_share" = [0.1]\n', "unknown corpus setting 'bound_share'"),
        ('[sweep]\nbase = "base.toml"\n[grid]\n"train.steps" = [8]\n', "write 'steps'"),
        ('[sweep]\nbase = "base.toml"\n[grid]\nsteps = [0]\n', "steps must be an integer >= 1"),
        ('[sweep]\nbase = "base.toml"\nseeds = []\n', "seeds must be a non-empty list"),
        ('[sweep]\nbase = "base.toml"\nseeds = [1, 1]\n', "lists a seed twice"),
        ('[sweep]\nbase = "base.toml"\ncpus_per_task = 0\n', "cpus_per_task must be a number > 0"),
        ('[sweep]\nbase = "base.toml"\nmodels = ["x"]\n', "models is not used by kind 'train'"),
        ('[sweep]\nkind = "grid"\n', "kind must be one of"),
        ('[sweep]\nbase = "base.toml"\n[dynamics]\nnn = 4\n', "did you mean 'n'"),
        ('[sweep]\nkind = "command"\nmodels = ["fixture:icl-tiny"]\n', "commands must be a non-empty list"),
        ('[sweep]\nkind = "command"\ncommands = ["evaluate --out x"]\nmodels = ["m"]\n', "gives --out"),
        ('[sweep]\nkind = "command"\ncommands = ["evaluate"]\nmodels = ["m"]\n[grid]\nn = [4]\n', "written --NAME"),
        ('steps = 3\n', r"unknown table \[steps\]"),
    ]
    for text, match in cases:
        path = tmp_path / "s.toml"
        path.write_text(text)
        with pytest.raises(InputError, match=match):
            sw.load_sweep(path)
    with pytest.raises(InputError, match="sweep file .* not found"):
        sw.load_sweep(tmp_path / "nope.toml")
    path.write_text('[sweep]\nbase = "base.toml"\nseeds = [0, 1]\n')
    assert [c.seed for c in sw.load_sweep(path, seed=7).cells()] == [7]  # --seed replaces the seeds
    assert len({c.cell_id for c in sw.load_sweep(path).cells()}) == 2
    with pytest.raises(InputError, match="engine must be one of"):
        sw.run_sweep(path, tmp_path / "o", engine="dask")
    for address, match in (("127.0.0.1:1", "no Ray cluster answers there"), ("nohost", "give HOST:PORT")):
        with pytest.raises(InputError, match=match):
            sw.check_address(address)


@pytest.mark.unit
def test_command_lines_are_checked_before_any_cell_runs(tmp_path, capsys):
    path = tmp_path / "c.toml"
    for commands, match in ((["evaluate --shotz 1"], "unrecognized arguments: --shotz"),
                            (["evalute"], "did you mean evaluate"), (["train"], "a sweep runs one of"),
                            (["head-scan", "evaluate"], "'evaluate .* unrecognized arguments: --seq-len 6"),
                            (["analyze no-such"], "unknown analysis 'no-such'")):  # fmt: skip
        grid = '[grid]\n"--seq-len" = [6]\n' if "head-scan" in commands else ""  # an option only head-scan has
        path.write_text(f'[sweep]\nkind = "command"\ncommands = {json.dumps(commands)}\nmodels = ["fixture:icl-tiny"]\n'
                        f'tasks = ["fixture-bound"]\n{grid}')  # fmt: skip
        with pytest.raises(InputError, match=match):
            sw.load_sweep(path).cells(sweep_commands())
    assert main(["sweep", str(path), "--out", str(tmp_path / "o"), "--engine", "local"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("icl-circuits sweep: error: sweep ") and "unknown analysis" in err[-1]


def test_engine_ray_without_ray_is_a_clear_error_and_local_needs_no_ray(tmp_path, monkeypatch, threads_back):
    path = write_sweep(tmp_path, grid="steps = [4]")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(InputError, match=r"pip install 'icl_circuits\[sweep\]'.*--engine local"):
        sw.run_sweep(path, tmp_path / "out", engine="ray")
    assert not (tmp_path / "out").exists()  # refused before writing anything
    res = sw.run_sweep(path, tmp_path / "out", engine="local", threads=1, progress=False)
    assert res.counts()["ok"] == 1 and res.rows[0]["pid"] == os.getpid()


@pytest.mark.unit
def test_the_shipped_sweep_files_load_and_the_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    shipped = sorted((REPO / "analyses" / "lab").glob("sweep_*.toml"))
    assert len(shipped) >= 2
    for path in shipped:
        spec = sw.load_sweep(path)
        cells = spec.cells(sweep_commands() if spec.kind == "command" else None)
        assert cells and all(c.threads == 1 for c in cells), path
    demo = sw.load_sweep(REPO / "analyses" / "lab" / "sweep_demo.toml").cells()
    assert [c.params for c in demo][:2] == [{"corpus.repeat_share": 0.2, "steps": 200, "checkpoint_every": 50,
                                             "seed": 0}, {"corpus.repeat_share": 0.2, "steps": 200,
                                                          "checkpoint_every": 50, "seed": 1}]  # fmt: skip
    taken = tmp_path / "taken.txt"
    taken.write_text("keep")
    assert main(["sweep", str(shipped[0]), "--out", str(taken)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an existing file" in err[0] and taken.read_text() == "keep"
    assert main(["sweep", "--help"]) == 0 and "--engine" in capsys.readouterr().out


def test_a_train_cell_interrupted_mid_run_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, threads_back):
    from safetensors.torch import load_file

    import icl_circuits.lab.train as lt

    path = write_sweep(tmp_path, grid="steps = [8]")
    (cell,) = sw.load_sweep(path).cells()
    out = tmp_path / "out"
    real, calls = lt.corpus.labelled_training_batch, []

    def interrupt_at_step_6(*args, **kw):  # Ctrl-C while step 6 draws its batch (checkpoint 4 is complete)
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(lt.corpus, "labelled_training_batch", interrupt_at_step_6)
    with pytest.raises(KeyboardInterrupt):  # not recorded as a cell error: the sweep stops
        sw.run_sweep(path, out, engine="local", threads=1, progress=False)
    monkeypatch.undo()
    assert table(out)["status"].tolist() == ["pending"] and not marker(out, cell.cell_id).exists()
    res = sw.run_sweep(path, out, engine="local", threads=1, progress=False)
    assert res.rows[0]["status"] == "ok" and res.rows[0]["resumed_from"] == 4
    direct = lt.train(sw.LabConfig.from_dict(cell.config), tmp_path / "direct", threads=1, progress=False)
    resumed = load_file(str(out / sw.CELLS_DIR / cell.cell_id / "step-000008" / "model.safetensors"))
    whole = load_file(str(direct.checkpoints[-1][1] / "model.safetensors"))
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)  # the same run as an uninterrupted one
