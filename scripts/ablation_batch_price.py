"""What a smaller mean-ablation batch costs: one 16-sequence sweep, then its subsets (README "Measured speed").

Runs the head scan's sweep (in-context gain on ``[BOS?, r, r]``, ``|r| = 20``, the scan's seed-0 sequences) on
all 16 sequences with per-example effects, then compares the estimates of disjoint 4- and 8-sequence subsets
(which reuse the 16-sequence means of ``z``) with the 16-sequence one: top-10 / top-5 overlap of the most
helpful heads (most negative effect) and Spearman over all heads. ~50 min for SmolLM2 on 2 busy cores::

    OMP_NUM_THREADS=1 python scripts/ablation_batch_price.py [--model smollm2-135m] [--save effects.pt]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from icl_circuits import load_model  # noqa: E402
from icl_circuits.heads import scores as hd  # noqa: E402
from icl_circuits.io import generator  # noqa: E402
from icl_circuits.patching.ablation import InContextGain, mean_ablation_sweep  # noqa: E402


def _rank(x: torch.Tensor) -> torch.Tensor:
    return x.argsort().argsort().double()


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([_rank(a), _rank(b)]))[0, 1])


def top(x: torch.Tensor, k: int) -> set[int]:
    """The ``k`` most negative effects (the heads that help most)."""
    return set(x.argsort()[:k].tolist())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="also save the per-example effects here (torch.save)")
    p.add_argument("--load", default=None, help="analyse saved per-example effects instead of sweeping")
    args = p.parse_args()
    if args.load:
        per_example = torch.load(args.load)["per_example"]  # [layer, head, 16]
    else:
        model = load_model(args.model, device="cpu")
        tokens = hd.repeated_random_tokens(model, 16, 20, generator(args.seed))
        start = time.perf_counter()
        sweep = mean_ablation_sweep(model, tokens, InContextGain(tokens, 20), progress=True,
                                    pattern_score=lambda pat: hd.induction_stripe(pat, 20))  # fmt: skip
        print(f"16-sequence sweep: {time.perf_counter() - start:.0f} s; clean gain {sweep.clean:.3f} nats")
        assert sweep.per_example is not None
        per_example = sweep.per_example
        if args.save:
            torch.save({"per_example": per_example, "effect": sweep.effect, "clean": sweep.clean}, args.save)
    H = int(per_example.shape[1])
    per = per_example.flatten(0, 1)  # [heads, 16]
    full = per.mean(1)
    best = sorted(top(full, 10), key=lambda i: float(full[i]))
    print("top 10 (16 sequences):", ", ".join(f"L{i // H}H{i % H} {float(full[i]):+.2f}" for i in best))
    for size in (4, 8):
        groups = [per[:, i : i + size].mean(1) for i in range(0, 16, size)]
        t10 = [len(top(g, 10) & top(full, 10)) for g in groups]
        t5 = [len(top(g, 5) & top(full, 5)) for g in groups]
        rho = [round(spearman(g, full), 2) for g in groups]
        print(f"{size} sequences, each disjoint subset vs the 16: top-10 overlap {t10}, top-5 {t5}, Spearman {rho}")
        pairs = [(groups[i], groups[i + 1]) for i in range(0, len(groups), 2)]
        t10 = [len(top(a, 10) & top(b, 10)) for a, b in pairs]
        rho = [round(spearman(a, b), 2) for a, b in pairs]
        print(f"{size} sequences, disjoint pairs against each other: top-10 overlap {t10}, Spearman {rho}")
    se = per.std(1) / 16**0.5
    print(f"standard error of a head's effect: median {float(se.median()):.3f} nats at 16 sequences, "
          f"{2 * float(se.median()):.3f} at 4")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
