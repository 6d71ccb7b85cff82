"""The README's few-shot table on SmolLM2-135M: accuracy by shots on the eight task files and the
two arbitrary-map (unseen) tasks, one model load, printed as Markdown.

    python scripts/smollm2_fewshot.py [--n 40] [--seed 0] [--shots 0,1,4,8]

Each cell is ``icl-circuits evaluate --model smollm2-135m --task T --shots ... --n N --seed S``.
"""

from __future__ import annotations

import argparse
import time

from icl_circuits import load_model
from icl_circuits.errors import ICLCircuitsError
from icl_circuits.tasks.registry import UNSEEN_TASKS, file_tasks, get_task
from icl_circuits.tasks.scoring import evaluate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", default="0,1,4,8")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the task files + unseen tasks)")
    a = p.parse_args()
    shots = [int(s) for s in a.shots.split(",")]
    start = time.perf_counter()
    model = load_model("smollm2-135m", device="cpu")
    print(f"| task | chance | {' | '.join(f'{k} shots' for k in shots)} |")
    print(f"|---|---|{'---|' * len(shots)}")
    names = a.tasks.split(",") if a.tasks else [*file_tasks(), *UNSEEN_TASKS]
    for name in names:
        try:
            ev = evaluate(model, get_task(name, model), shots, n=a.n, seed=a.seed)
        except ICLCircuitsError as e:  # a task this tokenizer cannot score: say so in the table
            print(f"| {name} | refused: {e} |", flush=True)
            continue
        cells = " | ".join(f"{r['accuracy']:.2f}" for r in ev.rows)
        print(f"| {name} | {ev.chance:.3f} | {cells} |", flush=True)
    print(f"\n(n = {a.n} per cell, seed {a.seed}; {time.perf_counter() - start:.0f} s including the model load)")


if __name__ == "__main__":
    main()
