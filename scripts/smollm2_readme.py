"""The README's "On a real model: SmolLM2-135M" numbers (except the few-shot table, ``smollm2_fewshot.py``):
one model load, the chosen stages, each printed as it finishes and written (JSON + offline HTML) under ``--out``.

    python scripts/smollm2_readme.py --stages heads,corruptions,attribution,demos [--n 16] [--seed 0]
    python scripts/smollm2_readme.py --stages analyses --analysis-n 8
    python scripts/smollm2_readme.py --stages transplant --transplant-n 16

Stages (each the library call behind the CLI command named, with the same arguments):

* ``heads``: ``icl-circuits head-scan --model smollm2-135m --no-ablation --seq-len 40`` (scores only);
* ``corruptions``: clean vs corrupted logit difference and accuracy of country-capital (4 shots) under each
  corruption of :data:`icl_circuits.tasks.pairs.CORRUPTIONS` (``other_task_labels`` with another
  task's labels, ``--other-task``), so the attribution uses a corruption that actually corrupts;
* ``attribution``: ``icl-circuits attribute --model smollm2-135m --task country-capital --shots 4 --n N
  --corruption C [--other-task T] --no-paths --function-vectors``;
* ``demos``: per-demo attribution on ``arbitrary-country-word`` (the query is one of the demos):
  ``icl-circuits attribute ... --task arbitrary-country-word --method M --no-positions --no-paths`` (``M``:
  ``--demo-method``, default ``atp``: the top heads by AtP, the cheap estimate of exact patching),
  then, per top head, the share of its output norm (and direct logit attribution) at the answer position that
  comes from the demo whose input is the query's input, against the ``1 / shots`` of a uniform reader;
* ``analyses``: the six observations (``icl-circuits analyze NAME --model smollm2-135m --n N``) and
  ``record-vs-circuit`` assembled from them (the same six runs); ``label-binding`` finds its induction heads
  with the scores-only head scan (``scan_ablation=False``);
* ``transplant``: ``icl-circuits fast-weights --model smollm2-135m --task country-capital --shots 4 --n N``, or
  with ``--transplant-layers`` only its transplant test (``transplant_test(..., layers=..., n_random=...)``);
* ``ceiling``: a check of the transplant's zero-shot floor, not a library feature: the *mean residual difference*
  ``mean(resid_pre[L] of 4-shot prompts) - mean(resid_pre[L] of zero-shot prompts)`` at the last position -- the
  single vector that moves the zero-shot mean exactly onto the few-shot mean at layer ``L``, an upper bound in
  spirit for one-vector transplants -- added at ``L`` to zero-shot prompts of held-out countries (half the
  inputs extract, the other half test), with and without a BOS in front; accuracy and the answer's median rank.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

STAGES = ("heads", "corruptions", "attribution", "demos", "analyses", "transplant", "ceiling")


def _say(stage: str, start: float, text: str) -> None:
    print(f"\n=== {stage} ({time.perf_counter() - start:.0f} s)\n{text}", flush=True)


def heads(model: Any, a: argparse.Namespace) -> None:
    from icl_circuits.heads.report import save_head_scan
    from icl_circuits.heads.scan import scan_heads

    t = time.perf_counter()
    scan = scan_heads(model, seq_len=40, ablation=False, seed=a.seed, progress=False)
    lines = [scan.summary()]
    for metric in ("induction", "previous_token"):
        s = scan.scores[metric]
        idx = torch.topk(s.reshape(-1), 6).indices
        lines.append(f"top {metric}: " + ", ".join(f"L{int(i) // s.shape[1]}H{int(i) % s.shape[1]} "
                                                   f"{float(s.reshape(-1)[i]):.2f}" for i in idx))  # fmt: skip
    save_head_scan(scan, model, Path(a.out) / "head_scan", model_spec="smollm2-135m")
    _say("heads", t, "\n".join(lines))


def corruptions(model: Any, a: argparse.Namespace) -> None:
    from icl_circuits.errors import ICLCircuitsError
    from icl_circuits.tasks.pairs import CORRUPTIONS, patching_batch
    from icl_circuits.tasks.registry import get_task
    from icl_circuits.tasks.scoring import score_tokens

    t = time.perf_counter()
    task, lines = get_task("country-capital", model), []
    for c in CORRUPTIONS:
        other = get_task(a.other_task, model) if c == "other_task_labels" else None
        try:
            b = patching_batch(model, task, a.shots, a.n, a.seed, corruption=c, other_task=other)
        except ICLCircuitsError as e:  # e.g. no label of the other task has a capital's token length
            lines.append(f"{c}: refused: {e}")
            continue
        kw = {"last_positions": b.last_positions}
        clean = score_tokens(model, b.clean_tokens, b.answer_tokens, b.contrast_tokens, **kw)
        bad = score_tokens(model, b.corrupted_tokens, b.answer_tokens, b.contrast_tokens, **kw)
        what = f" ({a.other_task} labels)" if other else ""
        lines.append(f"{c}{what}: clean LD {float(clean.logit_diff.mean()):.2f} "
                     f"acc {clean.accuracy:.2f}; corrupted LD {float(bad.logit_diff.mean()):.2f} "
                     f"acc {bad.accuracy:.2f}; e.g. {b.corrupted_prompts[0]!r}")  # fmt: skip
    _say("corruptions", t, "\n".join(lines))


def attribution(model: Any, a: argparse.Namespace) -> None:
    from icl_circuits.attribution.job import attribute, write_attribution
    from icl_circuits.io import provenance

    t = time.perf_counter()
    other = a.other_task if a.corruption == "other_task_labels" else None
    att = attribute(model, "country-capital", shots=a.shots, n=a.n, method="all", corruption=a.corruption,
                    other_task=other, seed=a.seed, paths=False, function_vectors=True, progress=False)  # fmt: skip
    prov = provenance(model, a.seed, task="country-capital", shots=a.shots, n=a.n, method="all",
                      corruption=a.corruption, other_task=other, paths=False, function_vectors=True)  # fmt: skip
    write_attribution(att, model, Path(a.out) / "attribution", prov)  # first: the numbers are kept if a print fails
    lines = [att.summary()]
    lines += [f"{k}: Pearson {v['pearson']:.2f}, Spearman {v['spearman']:.2f}" for k, v in att.correlations.items()]
    ov = att.induction_overlap()
    lines.append(f"induction heads {ov['induction_heads']}; among the top {ov['k']} exact heads: "
                 f"{ov['induction_heads_in_top']}")  # fmt: skip
    fv = att.function_vectors
    lines.append(fv.summary())
    fo = fv.overlap_with(att.induction_scores, att.overlap_k)
    lines.append(f"FV vs induction: {fo}")
    lines += [f"note: {x}" for x in att.notes]
    _say("attribution", t, "\n".join(lines))


def matched_demo(tokens: torch.Tensor, roles: Any) -> torch.Tensor:
    """``[batch]``: the demo whose input tokens equal the query's input tokens (-1 when none)."""
    from icl_circuits.tasks.roles import ROLE_NAMES

    key, qkey = ROLE_NAMES.index("demo_key"), ROLE_NAMES.index("query_key")
    out = []
    for b in range(tokens.shape[0]):
        q = tokens[b][roles.roles[b] == qkey].tolist()
        found = -1
        for d in range(roles.n_demos):
            if tokens[b][(roles.roles[b] == key) & (roles.demo_index[b] == d)].tolist() == q:
                found = d
        out.append(found)
    return torch.tensor(out)


def demos(model: Any, a: argparse.Namespace) -> None:
    from icl_circuits.attribution.job import attribute, write_attribution
    from icl_circuits.io import provenance

    t = time.perf_counter()
    task = "arbitrary-country-word"
    att = attribute(model, task, shots=a.shots, n=a.n, method=a.demo_method, seed=a.seed, positions=False,
                    paths=False, progress=False)  # fmt: skip
    prov = provenance(model, a.seed, task=task, shots=a.shots, n=a.n, method=a.demo_method, positions=False,
                      paths=False)  # fmt: skip
    write_attribution(att, model, Path(a.out) / "demos", prov)
    lines = [att.summary()]
    d = att.demos
    if d is None:
        _say("demos", t, "\n".join([*lines, *att.notes]))
        return
    match = matched_demo(att.batch.clean_tokens, d.roles)
    ok = match >= 0
    lines.append(f"prompts whose query input is one of the demos: {int(ok.sum())} of {len(match)}")
    demo_idx = d.roles.demo_index  # [batch, pos]
    for i, (l, h) in enumerate(d.heads):
        per = {}
        for kind in ("norm", "dla"):
            v = d.norm[i] if kind == "norm" else d.dla[i]  # [batch, pos]
            onehot = (demo_idx[..., None] == torch.arange(d.roles.n_demos)).to(v.dtype)
            by = torch.einsum("bp,bpd->bd", v, onehot)[ok]  # [batch', demo]
            m = match[ok]
            on = by[torch.arange(len(m)), m]
            per[kind] = (on, by)
        on_n, by_n = per["norm"]
        share = on_n / by_n.sum(-1).clamp_min(1e-9)
        top_is_match = (by_n.argmax(-1) == match[ok]).float().mean()
        on_d, by_d = per["dla"]
        rest_d = (by_d.sum(-1) - on_d) / max(d.roles.n_demos - 1, 1)
        effect = float(att.heads[att.primary].effect()[l, h])
        lines.append(f"L{l}H{h} ({att.primary} effect {effect:+.2f}): matched demo's "
                     f"share of the demos' output norm {float(share.mean()):.2f} (uniform {1 / d.roles.n_demos:.2f}); "
                     f"matched demo is its largest-norm demo in {float(top_is_match):.2f} of prompts; DLA from the "
                     f"matched demo {float(on_d.mean()):+.2f} vs {float(rest_d.mean()):+.2f} per other demo; "
                     f"whole head DLA {float(d.head_dla[i].mean()):+.2f}")  # fmt: skip
    lines += [f"note: {x}" for x in att.notes]
    _say("demos", t, "\n".join(lines))


def analyses(model: Any, a: argparse.Namespace) -> None:
    from icl_circuits.analyze import save_analysis
    from icl_circuits.analyze.label_binding import run_label_binding
    from icl_circuits.analyze.record_vs_circuit import PARTS, RecordVsCircuit
    from icl_circuits.models import model_info

    parts = []
    wanted = a.analyses.split(",")
    for name, run, _ in sorted((p for p in PARTS if p[0] in wanted), key=lambda p: wanted.index(p[0])):
        t = time.perf_counter()
        if name == "label-binding":  # the scores-only head scan (no mean-ablation sweep) names the heads
            result = run_label_binding(model, seed=a.seed, n=a.analysis_n, scan_ablation=False, progress=False)
        else:
            result = run(model, seed=a.seed, n=a.analysis_n, progress=False)
        parts.append(result)
        skipped = "".join(f"\nskipped: {s}" for s in getattr(result, "skipped", ()))
        save_analysis(result, model, Path(a.out) / "analyses", seed=a.seed, model_spec="smollm2-135m", n=a.analysis_n)
        _say(f"analysis {name}", t, f"{result.findings()['reading']}{skipped}")
    if len(parts) < len(PARTS):
        print(f"\n(record-vs-circuit not assembled: {len(parts)} of {len(PARTS)} observations run)")
        return
    by_name = {p.name: p for p in parts}
    rvc = RecordVsCircuit(model_info(model).spec, a.seed, tuple(by_name[name] for name, _, _ in PARTS))
    save_analysis(rvc, model, Path(a.out) / "analyses", seed=a.seed, model_spec="smollm2-135m", n=a.analysis_n)
    print("\n=== record-vs-circuit (the six above)\n" + rvc.markdown(), flush=True)


def transplant(model: Any, a: argparse.Namespace) -> None:
    from icl_circuits.fast_weights.job import run_fast_weights, write_fast_weights
    from icl_circuits.fast_weights.transplant import transplant_test
    from icl_circuits.io import atomic_write_json, provenance

    t = time.perf_counter()
    if a.transplant_layers:  # the transplant test alone, on fewer insertion layers and random controls
        layers = [int(x) for x in a.transplant_layers.split(",")]
        tr = transplant_test(model, "country-capital", a.shots, n=a.transplant_n, seed=a.seed, layers=layers,
                             n_random=a.n_random)  # fmt: skip
        prov = provenance(model, a.seed, task="country-capital", shots=a.shots, n=a.transplant_n, layers=layers,
                          n_random=a.n_random)  # fmt: skip
        atomic_write_json(Path(a.out) / "transplant.json", {**tr.to_dict(), "provenance": prov})
        d = tr.to_dict()
        _say("transplant", t, f"{d}")
        return
    run = run_fast_weights(model, "country-capital", a.shots, n=a.transplant_n, seed=a.seed)
    prov = provenance(model, a.seed, task="country-capital", shots=a.shots, n=a.transplant_n)
    write_fast_weights(run, Path(a.out) / "fast_weights", prov)
    _say("transplant", t, str(run.findings()["reading"]))


@torch.no_grad()
def ceiling(model: Any, a: argparse.Namespace) -> None:
    import numpy as np

    from icl_circuits.fast_weights.transplant import _extraction_examples, _fixed_inputs, logits_with_vector
    from icl_circuits.tasks.prompts import check_task
    from icl_circuits.tasks.registry import FewShot, Pair, get_task

    t0 = time.perf_counter()
    checked = check_task(model, get_task("country-capital", model))
    task = checked.task
    inputs = _fixed_inputs(task)
    order = [inputs[int(i)] for i in np.random.default_rng(a.seed).permutation(len(inputs))]
    test, train = order[: len(order) // 2], order[len(order) // 2 :]
    tok, lp, ans = _rendered(model, checked, [FewShot((), Pair(x, str(task.lookup(x)))) for x in test])
    ex_tok, ex_lp, ex_ans = _rendered(model, checked, _extraction_examples(task, a.shots, train, a.n,
                                                                           np.random.default_rng(a.seed)))  # fmt: skip
    names = lambda n: n.endswith("hook_resid_pre")  # noqa: E731
    _, few = model.run_with_cache(ex_tok, names_filter=names)
    acc_few = float((logits_with_vector(model, ex_tok, ex_lp, None, 0).argmax(-1) == ex_ans).float().mean())
    lines = [f"{len(test)} held-out zero-shot queries; {a.n} extraction prompts ({a.shots} shots, "
             f"accuracy {acc_few:.2f})"]
    bos = model.tokenizer.bos_token_id
    variants = {"no BOS (the model's setting)": (tok, lp),
                "BOS prepended": (torch.cat([torch.full((len(tok), 1), bos), tok], 1), lp + 1)}  # fmt: skip
    for name, (t, p) in variants.items():
        _, zero = model.run_with_cache(t, names_filter=names)
        cells = [f"none {_acc_rank(logits_with_vector(model, t, p, None, 0), ans)}"]
        for L in range(0, int(model.cfg.n_layers), 3):
            key = f"blocks.{L}.hook_resid_pre"
            vec = few[key][torch.arange(len(ex_tok)), ex_lp].mean(0) - zero[key][torch.arange(len(t)), p].mean(0)
            cells.append(f"L{L} {_acc_rank(logits_with_vector(model, t, p, vec, L), ans)}")
        lines.append(f"{name}: " + "; ".join(cells))
    _say("ceiling (accuracy / median rank of the answer)", t0, "\n".join(lines))


def _rendered(model: Any, checked: Any, examples: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from icl_circuits.tasks.roles import render_examples

    tokens, roles, answers, _ = render_examples(model, checked, examples)
    return tokens, roles.last_positions, answers


def _acc_rank(logits: torch.Tensor, answers: torch.Tensor) -> str:
    a = logits.gather(1, answers[:, None])[:, 0]
    rank = (logits > a[:, None]).sum(-1).float()
    return f"{float((logits.argmax(-1) == answers).float().mean()):.2f}/{float(rank.median()):.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--n", type=int, default=16, help="prompt pairs for corruptions / attribution / demos")
    p.add_argument("--shots", type=int, default=4)
    p.add_argument("--corruption", default="filler")
    p.add_argument("--other-task", default="english-french", help="labels for --corruption other_task_labels")
    p.add_argument("--analysis-n", type=int, default=8)
    p.add_argument("--analyses", default="information-flow,repetition,shots-and-noise,label-binding,unseen-task,order",
                   help="observations to run, in this order (record-vs-circuit is assembled when all six ran)")
    p.add_argument("--demo-method", default="atp", choices=["patching", "atp"])
    p.add_argument("--transplant-n", type=int, default=16)
    p.add_argument("--transplant-layers", default="", help="e.g. 0,6,12,18,24,30: transplant_test on these only")
    p.add_argument("--n-random", type=int, default=5, help="random controls of the transplant test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="out/smollm2")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from icl_circuits import load_model

    start = time.perf_counter()
    model = load_model("smollm2-135m", device="cpu")
    fns = {"heads": heads, "corruptions": corruptions, "attribution": attribution, "demos": demos,
           "analyses": analyses, "transplant": transplant, "ceiling": ceiling}  # fmt: skip
    for stage in a.stages.split(","):
        fns[stage](model, a)
    print(f"\n(all stages: {time.perf_counter() - start:.0f} s including the model load)")


if __name__ == "__main__":
    main()
