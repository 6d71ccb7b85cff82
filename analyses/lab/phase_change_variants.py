"""Why the attention-only phase-change runs formed no induction head: variants of ``phase_change.toml``.

    python -m analyses.lab.phase_change_variants --out out/lab/phase_change_variants

Trains each variant (skipped when its run folder already holds the last checkpoint of the same config), then
at every checkpoint prints the best induction score per layer, the best previous-token score, the in-context
score, and the losses on ``[BOS, r, r]`` (``r`` = 20 distinct tokens): ``early`` (first copy) and ``late``
(second copy). A model that only spreads its prediction over the tokens already in the context ("bag of
context tokens") has ``late`` near ``ln 20 = 3.00`` and ``early`` above ``ln 62 = 4.13`` (it bets on repeats
that do not come); induction takes ``late`` towards 0.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from icl_circuits.heads.scan import scan_heads
from icl_circuits.lab.config import load_config
from icl_circuits.lab.train import list_checkpoints, read_run_config, train
from icl_circuits.models import load_model

BASE = Path(__file__).resolve().parent / "phase_change.toml"
OLD = {"attn_only": True, "n_inner": 4}  # last session's attention-only model
VARIANTS: dict[str, dict[str, object]] = {
    # last session's config (lr 2e-3, batch 32) on repeated segments only
    "attn-only,lr2e-3,b32,repeats": {**OLD, "lr": 0.002, "batch_size": 32, "steps": 800, "checkpoint_every": 100,
                                      "corpus.repeat_share": 1.0},
    # the same at NOTES.md's lr 1e-3, batch 64
    "attn-only,lr1e-3,b64,repeats": {**OLD, "steps": 600, "checkpoint_every": 100, "corpus.repeat_share": 1.0},
    # NOTES.md's model (MLP 256, lr 1e-3, batch 64) on repeated segments only
    "mlp,lr1e-3,b64,repeats": {"checkpoint_every": 100, "corpus.repeat_share": 1.0},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="out/lab/phase_change_variants")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = load_config(BASE)
    print(f"bag-of-context reference: late ln 20 = {math.log(20):.2f}, uniform over 62 symbols ln 62 = "
          f"{math.log(62):.2f}")  # fmt: skip
    for name, overrides in VARIANTS.items():
        cfg = base.with_overrides(overrides)
        run_dir = Path(args.out) / name
        done = [s for s, _ in list_checkpoints(run_dir)] if run_dir.is_dir() else []
        if not (done and done[-1] == cfg.steps and read_run_config(run_dir) == cfg):
            train(cfg, run_dir, threads=1, progress=False, resume=bool(done))
        for step, folder in list_checkpoints(run_dir):
            scan = scan_heads(load_model(str(folder), device="cpu"), seq_len=20, batch=16, seed=0, ablation=False,
                              progress=False)  # fmt: skip
            ind, prev = scan.scores["induction"], scan.scores["previous_token"]
            per_layer = " ".join(f"L{l} {float(ind[l].max()):.2f}" for l in range(ind.shape[0]))
            print(f"{name} step {step}: induction {per_layer}; previous-token {float(prev.max()):.2f}; "
                  f"in-context score {scan.in_context_score:+.2f} (early {scan.loss_early:.2f}, "
                  f"late {scan.loss_late:.2f})", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
