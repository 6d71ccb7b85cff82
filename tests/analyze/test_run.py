"""The analysis registry, every analysis end to end on a small random model, the CLI, the scripts and the notebook."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from icl_circuits import InputError, TaskError
from icl_circuits.analyze import ANALYSES, Analysis, get_analysis, run_analysis, save_analysis
from icl_circuits.tasks.prompts import check_task
from icl_circuits.tasks.registry import get_task
from tests.helpers import REMOTE_SCRIPT, ROOT

SMALL = {  # small settings per analysis so each runs in seconds on the 2-layer random model
    "shots-and-noise": {"n": 8, "shots": (0, 2, 4), "noise": (0.0, 0.5), "noise_shots": 4},
    "order": {"n": 2, "n_orders": 4, "queries": 3, "shots": 3},
    "repetition": {"n": 6, "repeats": (1, 2)},
    "label-binding": {"n": 8, "heads": [(1, 0), (1, 3)], "n_controls": 2},
    "information-flow": {"n": 6},
    "unseen-task": {"n": 6, "shots": (0, 2), "head_shots": 2},
    "record-vs-circuit": {"n": 4},
}


@pytest.mark.unit
def test_registry():
    assert set(ANALYSES) == set(SMALL)
    assert all(spec.name == name for name, spec in ANALYSES.items())
    with pytest.raises(InputError, match="known: order, shots-and-noise"):
        get_analysis("nope")


@pytest.mark.fixture
@pytest.mark.parametrize("name", [n for n in SMALL if n != "record-vs-circuit"])
def test_analysis_runs_saves_and_reads_its_numbers(name, fixture_like, tmp_path):
    model, _ = fixture_like
    result = ANALYSES[name].run(model, seed=3, progress=False, **SMALL[name])
    assert isinstance(result, Analysis) and result.name == name and result.seed == 3
    assert len(result.to_dataframe()) > 0 and len(result.figures()) >= 1
    assert all(s.title and s.body for s in result.sections())
    assert "<h4>" in result._repr_html_()
    findings = result.findings()
    assert isinstance(findings["reading"], str) and findings["reading"]
    json_path, html_path = save_analysis(result, model, tmp_path, seed=3, n=SMALL[name].get("n"))
    data = json.loads(json_path.read_text())
    assert data["analysis"] == name and data["provenance"]["seed"] == 3
    assert data["provenance"]["model"]["spec"] == str(fixture_like[1])
    html = html_path.read_text()
    assert "plotly" in html and "Provenance" in html and html.count('class="reading"') >= 1


@pytest.mark.fixture
def test_readings_are_computed_from_the_numbers(fixture_like):
    """The reading quotes the measured values; other numbers give another reading."""
    from dataclasses import replace

    from icl_circuits.analyze.base import fmt

    model, _ = fixture_like
    r = ANALYSES["shots-and-noise"].run(model, seed=0, progress=False, **SMALL["shots-and-noise"])
    task = r.tasks[0]
    a0, a4 = r.value(task, 0, 0.0), r.value(task, 4, 0.0)
    assert f"{fmt(a0)}" in r.findings()["reading"]
    fake = tuple({**row, "accuracy": 0.9} if row["shots"] == 4 and row["noise"] == 0 else row for row in r.grid)
    changed = replace(r, grid=fake)
    assert "rises from" in changed.findings()["reading"] and "0.90" in changed.findings()["reading"]
    assert changed.findings()["reading"] != r.findings()["reading"] or a4 == 0.9


@pytest.mark.fixture
def test_same_seed_same_result_other_seed_other_prompts(fixture_like):
    model, _ = fixture_like
    kw = {"progress": False, **SMALL["order"]}
    a = ANALYSES["order"].run(model, seed=1, **kw).to_dict()
    b = ANALYSES["order"].run(model, seed=1, **kw).to_dict()
    c = ANALYSES["order"].run(model, seed=2, **kw).to_dict()
    assert a["rows"] == b["rows"] and a["rows"] != c["rows"]


@pytest.mark.fixture
def test_bad_inputs_raise_project_errors(fixture_like):
    model, _ = fixture_like
    with pytest.raises(InputError, match="n=0"):
        run_analysis("order", model, n=0, progress=False)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        ANALYSES["shots-and-noise"].run(model, n=4, noise=(1.5,), progress=False)
    with pytest.raises(TaskError, match="unknown task"):
        run_analysis("information-flow", model, n=2, tasks=["no-such-task"], progress=False)


@pytest.mark.real_model
@pytest.mark.shared
def test_language_model_path_on_aidreams(aidreams):
    """A real LM outside the fixture vocabulary: task files usable with its tokenizer, content-free "N/A"."""
    r = ANALYSES["order"].run(aidreams, n=2, n_orders=3, queries=2, progress=False)
    assert set(r.content_free.values()) == {"N/A"} and not any(t.startswith("fixture-") for t in r.tasks)
    assert len(r.tasks) == 2 and all(check_task(aidreams, get_task(t)).task.max_shots >= 5 for t in r.tasks)


@pytest.mark.fixture
def test_no_usable_default_task_says_why(tiny_gpt2):
    with pytest.raises(TaskError, match="no default task is usable.*antonym"):
        run_analysis("information-flow", tiny_gpt2, n=2, progress=False)


@pytest.mark.fixture
def test_cli_analyze_writes_json_and_html(fixture_like, tmp_path, capsys):
    from icl_circuits.cli import main

    _, folder = fixture_like
    assert main(["analyze", "list"]) == 0
    assert "information-flow" in capsys.readouterr().out
    argv = ["analyze", "information-flow", "--model", str(folder), "--n", "3", "--seed", "5", "--out", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "information_flow.json").read_text())
    assert data["seed"] == 5 and data["provenance"]["args"]["n"] == 3
    assert main(["analyze", "nope", "--model", str(folder)]) == 2
    assert "unknown analysis 'nope'" in capsys.readouterr().err


@pytest.mark.unit
def test_settings_parse_into_run_keywords():
    from icl_circuits.analyze import parse_settings

    assert parse_settings("order", ["n_orders=4", "queries=2"]) == {"n_orders": 4, "queries": 2}
    assert parse_settings("shots-and-noise", ["shots=2", "noise=0.25,0.5", "noise_shots=4"]) == {
        "shots": (2,), "noise": (0.25, 0.5), "noise_shots": 4}  # a sequence parameter gets a tuple
    assert parse_settings("repetition", ["fast_weights=false"]) == {"fast_weights": False}
    assert parse_settings("record-vs-circuit", ["order.queries=2", "unseen-task.tasks=antonym"]) == {
        "options": {"order": {"queries": 2}, "unseen-task": {"tasks": ("antonym",)}}}
    for bad, message in [(("order", ["queries"]), "KEY=VALUE, got 'queries'"),
                         (("order", ["nope=1"]), "order takes no 'nope'; it takes shots, n_orders, queries"),
                         (("order", ["n=3"]), r"\(n and tasks: --n, --tasks\)"),
                         (("record-vs-circuit", ["queries=2"]), "takes PART.PARAM"),
                         (("record-vs-circuit", ["order.seed=2"]), "part 'order' takes n, tasks, shots"),
                         (("record-vs-circuit", ["orders.queries=2"]), "no part 'orders'"),
                         (("nope", ["a=1"]), "unknown analysis 'nope'")]:  # fmt: skip
        with pytest.raises(InputError, match=message):
            parse_settings(*bad)


@pytest.mark.fixture
def test_cli_set_sizes_the_run_and_is_recorded(fixture_like, tmp_path, capsys, monkeypatch):
    """``--set KEY=VALUE`` reaches the run function and the provenance; a bad one is one line, exit 2, before the
    model loads, and writes nothing."""
    from icl_circuits.cli import main

    _, folder = fixture_like
    argv = ["analyze", "order", "--model", str(folder), "--n", "2", "--set", "n_orders=3", "--set", "queries=2",
            "--tasks", "fixture-rule", "--out", str(tmp_path / "a")]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((tmp_path / "a" / "order.json").read_text())
    assert data["n_orders"] == 3 and len(data["rows"]) == 2 * 3 and {r["n_queries"] for r in data["rows"]} == {2}
    assert data["provenance"]["args"]["settings"] == ["n_orders=3", "queries=2"]
    capsys.readouterr()
    import icl_circuits.models

    monkeypatch.setattr(icl_circuits.models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    bad = ["analyze", "order", "--model", str(folder), "--set", "n_order=3", "--out", str(tmp_path / "b")]
    assert main(bad) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "takes no 'n_order'" in lines[0], lines
    assert not (tmp_path / "b").exists()


@pytest.mark.unit
def test_scripts_wrap_the_cli(monkeypatch, capsys):
    import runpy

    scripts = sorted(p for p in (ROOT / "analyses").glob("*.py") if p.stem != "__init__")
    assert {p.stem.replace("_", "-") for p in scripts} == set(ANALYSES)
    for path in scripts:
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(path), run_name="__main__")
        assert done.value.code == 0
        assert "--tasks" in capsys.readouterr().out  # the help of `icl-circuits analyze`
    out = subprocess.run([sys.executable, str(scripts[0]), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--model" in out.stdout and "--seed" in out.stdout


@pytest.mark.real_model
@pytest.mark.slow  # a kernel that loads SmolLM2 (~20 s) and runs the real-model section at n=4
def test_tour_notebook_executes(fixture_like, tmp_path, monkeypatch):
    """``analyses/tour.ipynb`` runs top to bottom: sections 1-7 on the small random model with few prompts,
    section 8 on SmolLM2-135M (``smollm2-135m``, loaded in the kernel) with 4 prompts per condition."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ICL_TOUR_MODEL", str(fixture_like[1]))
    monkeypatch.setenv("ICL_TOUR_N", "4")
    monkeypatch.setenv("ICL_TOUR_OUT", str(tmp_path / "tour"))
    monkeypatch.setenv("PLOTLY_RENDERER", "plotly_mimetype+notebook")  # the README's HTML-export renderer
    monkeypatch.setenv("ICL_TOUR_REAL_N", "4")
    nb = nbformat.read(ROOT / "analyses" / "tour.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    assert len(list((tmp_path / "tour").glob("*.html"))) == 6
    # each figure also as HTML (what an nbconvert --to html export shows where plotly's JSON is not rendered)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if "data" in o]
    figures = [o for o in outputs if "application/vnd.plotly.v1+json" in o["data"]]
    assert len(figures) >= 6 and all("Plotly.newPlot" in o["data"].get("text/html", "") for o in figures)
    assert [p.name for p in (tmp_path / "tour" / "smollm2").glob("*.html")] == ["information_flow.html"]
    flow = json.loads((tmp_path / "tour" / "smollm2" / "information_flow.json").read_text())
    assert flow["model"] == "smollm2-135m" and flow["rows"]
    assert not any(r["task"].startswith("fixture-") for r in flow["rows"])


#: the smallest real settings of each part (``--set``): every code path of the six runs, at a fraction of the cost
QUICK = {"order.n_orders": "2", "order.queries": "2", "shots-and-noise.shots": "0,2", "shots-and-noise.noise": "0.5",
         "shots-and-noise.noise_shots": "2", "unseen-task.tasks": "country-capital,arbitrary-country-word",
         "unseen-task.shots": "0,2", "unseen-task.head_shots": "2", "repetition.repeats": "1,2",
         "label-binding.n_controls": "1"}  # fmt: skip


@pytest.mark.real_model
@pytest.mark.slow  # the six observations on SmolLM2, the head scan of label-binding and a 270-head sweep included
def test_cli_record_vs_circuit_runs_every_observation_on_the_loaded_real_model(smollm2, tmp_path, capsys):
    """``icl-circuits analyze record-vs-circuit`` in-process on SmolLM2 (``main(..., model=...)``: no reload) runs
    each of the six observations (``--n 2``, each part at its smallest real size through ``--set``: 2 orders of
    2 queries, shots 0 and 2 with one noise rate, one seen and one unseen task with the mean-ablation sweep over
    all 270 heads at 2 shots, r = 1, 2 with the fast weights, the head scan with one control draw); each writes
    its JSON on real-language tasks (the unseen task: an arbitrary symbol map), the page holds all of them
    offline, each reading is printed. At the defaults (``--n 2`` alone) this took 370 s on a quiet machine."""
    from icl_circuits.analyze.record_vs_circuit import PARTS
    from icl_circuits.cli import main

    settings = [f"{k}={v}" for k, v in QUICK.items()]
    argv = ["analyze", "record-vs-circuit", "--model", "smollm2-135m", "--n", "2", "--out", str(tmp_path),
            *(a for s in settings for a in ("--set", s))]  # fmt: skip
    assert main(argv, model=smollm2) == 0
    printed = capsys.readouterr().out
    whole = json.loads((tmp_path / "record_vs_circuit.json").read_text())
    assert whole["model"] == "smollm2-135m" and whole["provenance"]["args"]["n"] == 2
    assert whole["provenance"]["args"]["settings"] == settings
    parts = whole["parts"]  # the settings reached each part
    assert parts["order"]["n_orders"] == 2 and {r["n_queries"] for r in parts["order"]["rows"]} == {2}
    assert {r["shots"] for r in parts["shots-and-noise"]["grid"]} == {0, 2}
    assert {r["shots"] for r in parts["unseen-task"]["rows"]} == {0, 2}
    assert {r["repeat"] for r in parts["repetition"]["rows"]} == {1, 2}
    unseen = parts["unseen-task"]
    assert unseen["head_shots"] == 2 and {g: len(v) * len(v[0]) for g, v in unseen["head_effects"].items()} == {
        "seen": 270, "unseen": 270}  # every head ablated, in both groups
    assert parts["label-binding"]["n_controls"] == 1 and parts["label-binding"]["induction_heads"]  # the scan's
    assert list(whole["parts"]) == [name for name, _, _ in PARTS]
    page = (tmp_path / "record_vs_circuit.html").read_text()
    assert not REMOTE_SCRIPT.search(page) and (tmp_path / "record_vs_circuit.md").is_file()
    for name, _, _ in PARTS:
        part = json.loads((tmp_path / f"{name.replace('-', '_')}.json").read_text())
        rows = [r for v in part.values() if isinstance(v, list) for r in v if isinstance(r, dict)]
        tasks = {r["task"] for r in rows if "task" in r}
        assert part["model"] == "smollm2-135m" and part["findings"]["reading"], name
        assert tasks and not any(t.startswith("fixture-") for t in tasks), (name, tasks)
        assert f'id="{name}"' in page, name
        if name == "unseen-task":  # tasks the model cannot have seen: arbitrary symbol maps
            assert any(t.startswith("arbitrary-") for t in tasks), tasks
    assert whole["findings"]["reading"].split()[0] in printed


@pytest.mark.fixture
@pytest.mark.parametrize("name", [n for n in SMALL if n != "record-vs-circuit"])
def test_a_task_is_a_name_or_a_task(name, fixture_like):
    """``tasks=`` takes names or ``Task`` objects (resolved by ``get_task``): the same task either way gives the
    same result; a task outside the registry (a renamed ``Task``) runs under its own name."""
    from dataclasses import replace

    model, _ = fixture_like
    given = "fixture-rule-shift3" if name == "unseen-task" else "fixture-bound"
    kw = {"seed": 2, "progress": False, **SMALL[name]}
    by_name = ANALYSES[name].run(model, tasks=[given], **kw)
    if set(SMALL[name]) == {"n"}:  # run_analysis passes n, tasks and seed
        by_task = run_analysis(name, model, tasks=[get_task(given, model)], **kw)
    else:
        by_task = ANALYSES[name].run(model, tasks=[get_task(given, model)], **kw)
    assert by_task.to_dict() == by_name.to_dict()
    renamed = replace(get_task(given, model), name="my-task")
    own = ANALYSES[name].run(model, tasks=[renamed], **kw)
    shown = set(own.to_dataframe()["task"])
    assert "my-task" in shown and given not in shown
    with pytest.raises(TaskError, match="distinct names"):
        ANALYSES[name].run(model, tasks=[given, get_task(given, model)], **kw)
