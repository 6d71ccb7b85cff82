"""The ``icl-circuits`` command line. Each subcommand loads its module lazily, so ``--help`` is instant."""

from __future__ import annotations

import argparse
import json
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
        "  PATH/TO/model.bin         a llama2.c checkpoint; add --tokenizer tok.bin for text\n"
        "  HUB_NAME                  a Hugging Face hub model (gpt2, EleutherAI/pythia-70m-deduped, ...)"
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from icl_circuits.models import describe_fixture, list_fixtures

    if "icl-tiny" not in list_fixtures():
        print("The default model fixture:icl-tiny is not built yet: run `make fixtures`.")
        return 1
    print(json.dumps(describe_fixture("icl-tiny"), indent=2))
    return 0


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
