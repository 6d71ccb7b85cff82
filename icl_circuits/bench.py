"""Timings (``make bench``): each benchmark against the TransformerLens way of computing the same thing, same run.

Every benchmark is a function ``bench_<name>(quick: bool) -> list[BenchRow]`` registered in
:data:`BENCHMARKS`; :func:`main` runs them (all, or those named on the command line) and prints one
table with ``ratio = TransformerLens seconds / our seconds`` (> 1: ours is faster). ``--quick`` lets a
benchmark cut its slowest part and say so in the row's note. Wall-clock seconds on whatever the
machine gives (``torch.get_num_threads()`` is printed); warm-up forwards are excluded.

The shared model is a GPT-2-small-sized GPT-2 with random weights (``GPT2Config()``: 12 layers x 12
heads, d_model 768, 50257-token word-level vocabulary), saved to a temporary folder and loaded with
:func:`icl_circuits.load_model` like any Hugging Face folder (:func:`gpt2_small_random`).
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BenchRow:
    """One timing: ours and, where TransformerLens computes the same thing, its way."""

    benchmark: str
    what: str
    ours_s: float
    reference: str = ""
    reference_s: float | None = None
    note: str = ""
    ours_mb: float | None = None  # peak resident memory above the start of the timed call (MB), when measured
    reference_mb: float | None = None

    @property
    def ratio(self) -> float | None:
        return None if self.reference_s is None else self.reference_s / self.ours_s


@contextmanager
def _timer(out: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        out.append(time.perf_counter() - start)


def _rss_kb(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in kB from ``/proc/self/status`` (``None`` where there is none)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


@contextmanager
def _measured(times: list[float], peaks: list[float | None]) -> Iterator[None]:
    """Time the block (``times``) and its peak resident memory above the start, in MB (``peaks``).

    Peak RSS, not tracemalloc (which misses torch's allocations): freed heap is returned first
    (``gc.collect``, glibc ``malloc_trim``), the kernel's high-water mark reset (``/proc/self/clear_refs``
    = 5, Linux >= 4.0), then ``VmHWM - VmRSS(start)`` after the block. ``None`` where Linux's /proc is missing.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        start = _rss_kb("VmRSS")
    except OSError:
        start = None
    with _timer(times):
        yield
    peak = _rss_kb("VmHWM")
    peaks.append(None if start is None or peak is None else (peak - start) / 1024)


_TMP: list[Any] = []  # keeps the temporary model folder alive for the process


@functools.lru_cache(maxsize=1)
def gpt2_small_random(seed: int = 0) -> Any:
    """A GPT-2-small-sized bridge with random weights and a word-level tokenizer (``t1`` ... ``t50256``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from icl_circuits.models import load_model

    cfg = GPT2Config()
    words = ["<|endoftext|>"] + [f"t{i}" for i in range(1, cfg.vocab_size)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=words[0], eos_token=words[0], unk_token=words[0])
    torch.manual_seed(seed)  # HF initialises weights from the global generator; nothing else here uses it
    tmp = tempfile.TemporaryDirectory(prefix="icl_circuits_bench_")
    _TMP.append(tmp)
    GPT2LMHeadModel(cfg).save_pretrained(tmp.name)
    tok.save_pretrained(tmp.name)
    return load_model(tmp.name, device="cpu")


def _demo_tokens(batch: int, shots: int, arrow: int, sep: int, seed: int = 0) -> torch.Tensor:
    """``[batch, 1 + 4 * shots + 2]``: ``<bos> k -> v SEP ... kq ->`` with random keys and labels in ``10..999``."""
    tokens = torch.randint(10, 1000, (batch, 1 + 4 * shots + 2), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 0
    for i in range(shots):
        tokens[:, 1 + 4 * i + 1], tokens[:, 1 + 4 * i + 3] = arrow, sep
    tokens[:, -1] = arrow
    return tokens


def bench_head_scan(quick: bool = False) -> list[BenchRow]:
    """Head scan of the GPT-2-small-sized model: batch 8 of ``[BOS, r, r]`` with ``|r| = 50``.

    References: ``head_detector.detect_head`` (one sequence per forward) for the induction,
    previous- and duplicate-token scores; ``patching.generic_activation_patch`` with the z patch
    setter and a cache of per-position means (one forward per head) for the mean-ablation sweep.
    ``quick``: the ablation comparison covers only the 12 heads of the last layer.
    """
    import pandas as pd
    from transformer_lens import patching
    from transformer_lens.head_detector import detect_head

    from icl_circuits.heads import scores as hd
    from icl_circuits.heads.scan import scan_heads
    from icl_circuits.io import generator
    from icl_circuits.patching.ablation import InContextGain, mean_ablation_sweep
    from icl_circuits.shapes import all_heads

    model = gpt2_small_random()
    batch, n = 8, 50
    tokens = hd.repeated_random_tokens(model, batch, n, generator(0))
    prefix = hd.repeated_random_tokens(model, batch, n, generator(1), repeats=4)
    with torch.no_grad():
        model(tokens[:1, :8])  # warm-up
    t: list[float] = []
    with _timer(t), torch.no_grad():
        hd.attention_scores(model, tokens, n, prefix, 4)
    texts = [" ".join(model.tokenizer.convert_ids_to_tokens(row[1:].tolist())) for row in tokens]
    with _timer(t):
        for kind in ("induction_head", "previous_token_head", "duplicate_token_head"):
            detect_head(model, texts, kind)
    with _timer(t):
        scan = scan_heads(model, seq_len=n, batch=batch, seed=0, ablation=False, progress=False)
    rows = [
        BenchRow("head_scan", "attention scores (4 metrics, 144 heads)", t[0],
                 "detect_head x3 kinds, 8 seqs", t[1], "2 batched forwards vs 24 single-sequence forwards"),
        BenchRow("head_scan", "scan without ablation (+copying, composition)", t[2], "", None,
                 f"max induction {float(scan.scores['induction'].max()):.3f} (random weights)"),
    ]
    every = all_heads(model)
    subset = [(model.cfg.n_layers - 1, h) for h in range(model.cfg.n_heads)] if quick else every
    mean_cache, metric = _tl_mean_ablation(model, tokens, n)

    t = []
    with _timer(t):
        ours = mean_ablation_sweep(model, tokens, InContextGain(tokens, n), heads=subset).effect
    with _timer(t), torch.no_grad():
        index_df = pd.DataFrame(subset, columns=["layer", "head"])
        theirs = patching.generic_activation_patch(
            model, tokens, mean_cache, metric, patching.layer_head_vector_patch_setter, "z", index_df=index_df
        )
    clean = -hd.in_context_score(model(tokens).detach(), tokens, n)
    gap = max(abs(float(ours[l, h]) - (float(theirs[i]) - clean)) for i, (l, h) in enumerate(subset))
    what = f"mean-ablation sweep ({len(subset)} heads)"
    rows.append(BenchRow("head_scan", what, t[0], "generic_activation_patch (z)", t[1],
                         f"max |ours - TL| = {gap:.1e} nats"))
    if quick:
        est = t[0] * len(every) / len(subset) + rows[1].ours_s
        rows.append(BenchRow("head_scan", "scan with ablation (144 heads)", est, "", None,
                             f"ESTIMATE: {len(subset)}-head sweep x {len(every) // len(subset)} + scan"))
    else:
        rows.append(BenchRow("head_scan", "scan with ablation (144 heads)", rows[1].ours_s + t[0], "", None,
                             "scan without ablation + the sweep above"))
    return rows


def bench_fast_weights(quick: bool = False) -> list[BenchRow]:
    """Fast-weight decomposition of every head of the GPT-2-small-sized model: 8 prompts of 8 demos
    ``k -> v ;`` (35 tokens) in a word-level vocabulary.

    Reference: TransformerLens's ``run_with_cache`` (full cache) + ``ActivationCache.stack_head_results
    (pos_slice=-1, apply_ln=True)``, which gives the per-head outputs at the query only; ours gives
    them too (checked equal) plus the split by source role and demo and both fast-weight matrices.
    ``quick``: the first 3 layers' heads only.
    """
    from icl_circuits.fast_weights import decompose as fw

    model = gpt2_small_random()
    batch, shots, arrow, sep = 8, 8, 3, 4
    tokens = _demo_tokens(batch, shots, arrow, sep)
    roles = fw.roles_from_tokens(tokens, arrow_id=arrow, sep_id=sep)
    layers = range(3) if quick else range(model.cfg.n_layers)
    heads = [(l, h) for l in layers for h in range(model.cfg.n_heads)]
    with torch.no_grad():
        model(tokens[:1, :8])  # warm-up
    t: list[float] = []
    with _timer(t):
        dec = fw.decompose(model, tokens, roles, heads)
    with _timer(t), torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        theirs = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [head, batch, d_model]
    with _timer(t):
        fw.summarize(model, dec, tokens[:, 1])
    ours = dec.head_out / dec.final_scale[:, None, None]
    gap = float((ours.transpose(0, 1) - theirs[: len(heads)]).abs().max())
    note = f"{len(heads)} heads; max |ours - TL| head output {gap:.1e}"
    return [
        BenchRow("fast_weights", "decompose (roles, demos, dW_lin, dW_soft)", t[0],
                 "run_with_cache + stack_head_results", t[1], note),
        BenchRow("fast_weights", "summarize (SVDs, reconstruction, logit lens)", t[2], "", None, note),
    ]  # fmt: skip


def _bound_pairs(model: Any, n: int, seed: int) -> Any:
    """Clean/corrupted ``fixture-bound`` prompts, 8 demos, labels shuffled among the demos in the corrupted one."""
    from icl_circuits.tasks.pairs import patching_batch
    from icl_circuits.tasks.registry import get_task

    return patching_batch(model, get_task("fixture-bound", model), 8, n, seed, corruption="shuffled_labels")


def bench_patching(quick: bool = False) -> list[BenchRow]:
    """All-heads exact patching of head outputs (all positions, denoising) and AtP / AtP* on the
    GPT-2-small-sized model, batch 8 x 32 random tokens (corrupted: positions 4..11 re-drawn).

    Reference for exact patching: ``patching.get_act_patch_attn_head_out_all_pos`` (one forward per
    head, 144) with the same per-example logit-difference metric; ours:
    :func:`icl_circuits.patching.exact.activation_patch`; the two are checked equal (max |diff| in the note).
    A second row runs ours with GPT-2's own Python-level GELU (``fast_activations=False``) to show
    what the fused kernel contributes.
    Reference for AtP: ``tools.analysis.attribution_patch`` (node granularity, one clean forward and
    one corrupted forward + backward per example). Then, when ``fixture:icl-tiny`` is built, the
    agreement of AtP, AtP+QK fix and AtP* (GradDrop) with exact head-output patching on 32
    ``fixture-bound`` prompt pairs (:func:`_bound_pairs`): Pearson and Spearman over the 16 heads.
    ``quick``: the TransformerLens loop covers the last layer's 12 heads, its time scaled by 12.
    """
    import pandas as pd
    from transformer_lens import patching as tlp
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attribution_patch

    from icl_circuits.models import list_fixtures, load_model
    from icl_circuits.patching.atp import attribution_patch
    from icl_circuits.patching.exact import activation_patch

    model = gpt2_small_random()
    gen = torch.Generator().manual_seed(0)
    batch, n_pos = 8, 32
    clean = torch.randint(1, model.cfg.d_vocab, (batch, n_pos), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 4:12] = torch.randint(1, model.cfg.d_vocab, (batch, 8), generator=gen)
    answer = torch.randint(1, model.cfg.d_vocab, (batch,), generator=gen)
    contrast = (answer + 1 + torch.randint(1000, (batch,), generator=gen)) % model.cfg.d_vocab
    rows_ = torch.arange(batch)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[rows_, -1, answer] - logits[rows_, -1, contrast]

    with torch.no_grad():
        model(clean[:1, :8])  # warm-up
    t: list[float] = []
    with _timer(t):
        ours = activation_patch(model, clean, corrupted, answer, contrast, "z", progress=False)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    with _timer(t), torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))
        if quick:
            index = pd.DataFrame([(n_layers - 1, h) for h in range(n_heads)], columns=["layer", "head"])
            swept: Any = tlp.get_act_patch_attn_head_out_all_pos(
                model, corrupted, cache, metric, index_axis_names=None, index_df=index, reduce="none"
            )
            theirs = swept.values.reshape(1, n_heads, batch)
            gap = float((ours.patched_logit_diff[-1:] - theirs).abs().max())
        else:
            swept = tlp.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric, reduce="none")
            theirs = swept.values
            gap = float((ours.patched_logit_diff - theirs).abs().max())
    ref_s = t[1] * n_layers if quick else t[1]
    note = f"max |ours - TL| = {gap:.1e} logits" + (f"; TL ESTIMATE: last layer x {n_layers}" if quick else "")
    rows = [BenchRow("patching", f"exact head-out patching ({n_layers * n_heads} heads)", t[0],
                     "get_act_patch_attn_head_out_all_pos", ref_s, note)]  # fmt: skip
    if not quick:
        t = []
        with _timer(t):
            plain = activation_patch(model, clean, corrupted, answer, contrast, "z", fast_activations=False,
                                     progress=False)  # fmt: skip
        gap = float((plain.patched_logit_diff - ours.patched_logit_diff).abs().max())
        rows.append(BenchRow("patching", "  same, GPT-2's own Python GELU kept", t[0],
                             "get_act_patch_attn_head_out_all_pos", ref_s,
                             f"fast_activations=False; max |diff| to the fused run {gap:.1e}"))  # fmt: skip
    t = []
    with _timer(t):
        atp = attribution_patch(model, clean, corrupted, answer, contrast, "z", per_position=True, graddrop=False)
    scores = torch.zeros(n_layers, n_pos, n_heads)
    with _timer(t):  # TransformerLens's metric sees one example's logits: call it per example, as it loops itself
        for b in range(batch):
            a_b, c_b = int(answer[b]), int(contrast[b])

            def metric_b(lg: torch.Tensor, a_b: int = a_b, c_b: int = c_b) -> torch.Tensor:
                return lg[0, -1, a_b] - lg[0, -1, c_b]

            ref = tl_attribution_patch(model, clean[b : b + 1], corrupted[b : b + 1], metric_b)
            for node, v in ref.node_scores.items():
                if node.kind == "attn_head_out":
                    scores[node.layer, node.position, node.head] += v / batch
    with _timer(t):
        attribution_patch(model, clean, corrupted, answer, contrast, "z", graddrop=True)
    gap = float((atp.atp.mean(-1) - scores).abs().max())
    rows.append(BenchRow("patching", "AtP, heads x positions", t[0], "tools.analysis.attribution_patch", t[1],
                         f"z nodes: max |ours - TL| = {gap:.1e}"))  # fmt: skip
    rows.append(BenchRow("patching", f"AtP* (QK fix + GradDrop, {n_layers} extra backwards)", t[2], "", None,
                         "no TransformerLens counterpart"))  # fmt: skip
    if "icl-tiny" in list_fixtures():
        tiny = load_model("fixture:icl-tiny", device="cpu")
        pairs = _bound_pairs(tiny, 32, 0)
        args = (tiny, pairs.clean_tokens, pairs.corrupted_tokens, pairs.answer_tokens, pairs.contrast_tokens, "z")
        t = []
        with _timer(t):
            exact = activation_patch(*args, answer_positions=pairs.last_positions, progress=False)
        with _timer(t):
            est = attribution_patch(*args, answer_positions=pairs.last_positions)
        agree = est.agreement(exact)
        gap = float((exact.clean_logit_diff - exact.corrupted_logit_diff).mean())
        corr = "; ".join(f"{k} r={v:.3f} rho={agree.spearman[k]:.3f}" for k, v in agree.pearson.items())
        rows.append(BenchRow("patching", "icl-tiny bound (32 pairs): AtP* vs exact, 16 heads", t[1], "", None,
                             f"LD gap {gap:.2f}; exact {t[0]:.2f}s; {corr}"))  # fmt: skip
    else:
        rows.append(BenchRow("patching", "icl-tiny bound: AtP/AtP* vs exact", 0.0, "", None,
                             "SKIPPED: fixture:icl-tiny not built (make fixtures)"))  # fmt: skip
    return rows


def bench_analyses(quick: bool = False) -> list[BenchRow]:
    """Readouts of the analyses (:mod:`icl_circuits.analyze`) on the GPT-2-small-sized model: 8 prompts of
    8 demos ``k -> v ;`` (35 tokens).

    References: per-head direct logit attribution -- ``run_with_cache`` + ``ActivationCache.stack_head_results
    (pos_slice=-1, apply_ln=True)`` projected on ``W_U[:, answer] - W_U[:, contrast]``; single-head mean
    ablation of the logit difference -- ``patching.generic_activation_patch`` with the z patch setter and a
    cache of per-position means (one forward per head). Label-word saliency (Wang et al.) has no
    TransformerLens counterpart. ``quick``: the ablation sweep covers only the 12 heads of the last layer.
    """
    import pandas as pd
    from transformer_lens import ActivationCache, patching

    from icl_circuits.analyze.base import head_logit_attribution
    from icl_circuits.analyze.information_flow import saliency
    from icl_circuits.patching.ablation import LogitDiff, mean_ablation_sweep

    model = gpt2_small_random()
    batch, shots, arrow, sep = 8, 8, 3, 4
    tokens = _demo_tokens(batch, shots, arrow, sep)
    answers, contrasts = tokens[:, 3], tokens[:, 7]
    rows_idx = torch.arange(batch)
    with torch.no_grad():
        model(tokens[:1, :8])  # warm-up
    t: list[float] = []
    with _timer(t):
        ours = head_logit_attribution(model, tokens, answers, contrasts, batch_size=batch)
    with _timer(t), torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        stacked = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # [L*H, batch, d_model]
        W_U = model.W_U.detach()
        theirs = torch.einsum("kbd,db->bk", stacked, W_U[:, answers] - W_U[:, contrasts]).reshape(ours.shape)
    del cache, stacked
    rows = [BenchRow("analyses", "head logit attribution (144 heads)", t[0], "run_with_cache + stack_head_results",
                     t[1], f"max |ours - TL| {float((ours - theirs).abs().max()):.1e} logits")]  # fmt: skip
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    heads = [(L - 1, h) for h in range(H)] if quick else [(l, h) for l in range(L) for h in range(H)]
    z_names = [f"blocks.{l}.attn.hook_z" for l in range(L)]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in z_names)
    means = {k: cache[k].mean(0, keepdim=True).expand_as(cache[k]).clone() for k in z_names}
    mean_cache = ActivationCache(means, model)
    del cache

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return (logits[rows_idx, -1, answers] - logits[rows_idx, -1, contrasts]).mean()

    t = []
    with _timer(t):
        ld = LogitDiff(answers, contrasts, torch.full((batch,), tokens.shape[1] - 1))
        eff = mean_ablation_sweep(model, tokens, ld, heads=heads).effect
    with _timer(t), torch.no_grad():
        index_df = pd.DataFrame(heads, columns=["layer", "head"])
        setter = patching.layer_head_vector_patch_setter
        patched = patching.generic_activation_patch(model, tokens, mean_cache, metric, setter, "z", index_df=index_df)
        clean = float(metric(model(tokens)))
    gap = max(abs(float(eff[l, h]) - (float(patched[i]) - clean)) for i, (l, h) in enumerate(heads))
    rows.append(BenchRow("analyses", f"single-head mean ablation of LD ({len(heads)} heads)", t[0],
                         "generic_activation_patch (z)", t[1], f"max |ours - TL| = {gap:.1e} logits"))  # fmt: skip
    t = []
    with _timer(t):
        saliency(model, tokens, answers, batch_size=batch)
    rows.append(BenchRow("analyses", "label-word saliency I_l (12 layers, grad wrt patterns)", t[0], "", None,
                         "one forward + backward; no TransformerLens counterpart"))  # fmt: skip
    return rows


def _tl_mean_ablation(model: Any, tokens: torch.Tensor, n: int) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor]]:
    """TransformerLens's inputs for a mean-ablation sweep of ``tokens [batch, pos]``: an ``ActivationCache`` of
    every layer's ``hook_z`` replaced by its per-position batch mean, and the in-context gain (early - late,
    nats, on ``|r| = n``) as ``generic_activation_patch``'s metric."""
    from transformer_lens import ActivationCache

    from icl_circuits.heads import scores as hd

    z_names = [f"blocks.{l}.attn.hook_z" for l in range(int(model.cfg.n_layers))]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in z_names)
    mean_cache = ActivationCache({k: cache[k].mean(0, keepdim=True).expand_as(cache[k]).clone() for k in z_names},
                                 model)  # fmt: skip

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return torch.tensor(-hd.in_context_score(logits, tokens, n))

    return mean_cache, metric


def _one_head_per_layer(n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """``(l, l mod H)`` for every layer: a peer's one-forward-per-head loop costs the same for every head,
    so its time on these ``L`` heads times ``H`` estimates all ``L H`` (marked ESTIMATE in the row)."""
    return [(l, l % n_heads) for l in range(n_layers)]


def bench_real_head_scan(model: Any, quick: bool = False) -> list[BenchRow]:
    """The head scan of a real model at its defaults (:func:`icl_circuits.heads.scan.scan_heads`: 16 x
    ``[BOS?, r, r]``, ``|r| = 20``, the sweep on the model kind's ``ablation_batch``), stage by stage, and
    its mean-ablation sweep against ``patching.generic_activation_patch`` (z setter, per-position means of
    the same sequences; one forward per head) on one head per layer, time x ``n_heads`` = ESTIMATE.
    ``quick``: no TransformerLens row.
    """
    import pandas as pd
    from transformer_lens import patching

    from icl_circuits.heads import scores as hd
    from icl_circuits.heads.scan import scan_heads

    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    with torch.no_grad():
        model(torch.zeros(1, 8, dtype=torch.long))  # warm-up
    t: list[float] = []
    mb: list[float | None] = []
    with _measured(t, mb):
        scan = scan_heads(model, seq_len=20, batch=16, seed=0, progress=False)
    stages = "; ".join(f"{k} {v:.1f}s" for k, v in scan.timings.items())
    rows = [BenchRow("real", f"head scan with ablation ({L * H} heads)", t[0], "", None, stages, mb[0])]
    if quick:
        return rows
    nb, n = int(scan.ablation_batch or scan.batch), scan.seq_len
    tokens = scan.tokens[:nb]
    sweep_s = next(v for k, v in scan.timings.items() if k.startswith("mean-ablation sweep"))
    subset = _one_head_per_layer(L, H)
    mean_cache, metric = _tl_mean_ablation(model, tokens, n)

    t, mb = [], []
    with _measured(t, mb), torch.no_grad():
        index = pd.DataFrame(subset, columns=["layer", "head"])
        theirs = patching.generic_activation_patch(model, tokens, mean_cache, metric,
                                                   patching.layer_head_vector_patch_setter, "z", index_df=index)
        clean = -hd.in_context_score(model(tokens).detach(), tokens, n)
    gap = max(abs(float(scan.scores["ablation"][l, h]) - (float(theirs[i]) - clean)) for i, (l, h) in enumerate(subset))
    rows.append(BenchRow("real", f"  its mean-ablation sweep ({L * H} heads x {nb} seqs)", sweep_s,
                         "generic_activation_patch (z)", t[0] * H,
                         f"TL ESTIMATE: {len(subset)} heads (one per layer) x {H}; max |ours - TL| {gap:.1e} nats "
                         "on them; ours MB: see the scan row", None, mb[0]))  # fmt: skip
    return rows


@torch.no_grad()
def _nnsight_head_patching(
    lm: Any, clean: torch.Tensor, corrupted: torch.Tensor, heads: list[tuple[int, int]], d_head: int,
    answer: torch.Tensor, contrast: torch.Tensor, last: torch.Tensor,
) -> torch.Tensor:
    """nnsight's activation-patching loop on a Hugging Face Llama: save every layer's ``o_proj`` input (the
    heads' ``z``, ``[batch, pos, n_heads d_head]``) on the clean run, then one traced corrupted run per head
    with that head's slice set to its clean value. Returns ``[len(heads), batch]`` logit differences."""
    zs = []
    n_layers = max(l for l, _ in heads) + 1
    with lm.trace(clean):
        for layer in range(n_layers):
            zs.append(lm.model.layers[layer].self_attn.o_proj.input.save())
    rows = torch.arange(clean.shape[0])
    out = []
    for layer, head in heads:
        cols = slice(head * d_head, (head + 1) * d_head)
        src = zs[layer]
        with lm.trace(corrupted):
            z = lm.model.layers[layer].self_attn.o_proj.input
            z[:, :, cols] = src[:, :, cols]
            logits = lm.output.logits.save()
        out.append(logits[rows, last, answer] - logits[rows, last, contrast])
    return torch.stack(out)


def bench_real_patching(model: Any, quick: bool = False) -> list[BenchRow]:
    """All-heads exact head-output patching (denoising, all positions) and AtP / AtP* on a real model:
    ``country-capital``, 4 pairs of 4-shot prompts with shuffled demo labels, logit difference
    answer - contrast at each prompt's answer position.

    Peers, same inputs, same metric: TransformerLens's ``get_act_patch_attn_head_out_all_pos`` and
    nnsight's documented loop (one traced forward per head, :func:`_nnsight_head_patching`, on the same
    float32 Hugging Face folder), each on one head per layer, time x ``n_heads`` = ESTIMATE; TransformerLens's
    ``tools.analysis.attribution_patch`` (one clean forward + one corrupted forward/backward per example) for AtP.
    nnsight rows need ``pip install nnsight`` (the ``peers`` extra); without it they say so.
    ``quick``: ours only.
    """
    import pandas as pd
    from transformer_lens import patching as tlp

    from icl_circuits.patching.exact import activation_patch

    L, H, d_head = int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head)
    pairs = _real_pairs(model)
    clean, corrupted = pairs.clean_tokens, pairs.corrupted_tokens
    answer, contrast, last = pairs.answer_tokens, pairs.contrast_tokens, pairs.last_positions
    rows_ = torch.arange(clean.shape[0])
    what = f"{clean.shape[0]} pairs x {clean.shape[1]} tokens"
    t: list[float] = []
    mb: list[float | None] = []
    with _measured(t, mb):
        ours = activation_patch(model, clean, corrupted, answer, contrast, "z", answer_positions=last, progress=False)
    ours_s, ours_mb = t[0], mb[0]
    rows: list[BenchRow] = []
    subset = _one_head_per_layer(L, H)
    ours_sub = torch.stack([ours.patched_logit_diff[l, h] for l, h in subset])  # [len(subset), batch]
    if not quick:

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logits[rows_, last, answer] - logits[rows_, last, contrast]

        with torch.no_grad():
            _, cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("attn.hook_z"))
        t, mb = [], []
        with _measured(t, mb), torch.no_grad():
            index = pd.DataFrame(subset, columns=["layer", "head"])
            swept: Any = tlp.get_act_patch_attn_head_out_all_pos(model, corrupted, cache, metric,
                                                                 index_axis_names=None, index_df=index, reduce="none")
        del cache
        gap = float((ours_sub - swept.values.reshape(len(subset), -1)).abs().max())
        rows.append(BenchRow("real", f"exact head-out patching ({L * H} heads, {what})", ours_s,
                             "get_act_patch_attn_head_out_all_pos", t[0] * H,
                             f"TL ESTIMATE: {len(subset)} heads (one per layer) x {H}; "
                             f"max |ours - TL| {gap:.1e} logits",
                             ours_mb, mb[0]))  # fmt: skip
    else:
        rows.append(BenchRow("real", f"exact head-out patching ({L * H} heads, {what})", ours_s, "", None, "",
                             ours_mb))  # fmt: skip
    if not quick:
        try:
            from nnsight import NNsight
        except ImportError:
            rows.append(BenchRow("real", "  same, nnsight loop", ours_s, "nnsight", None,
                                 "SKIPPED: nnsight is not installed (pip install -e '.[peers]')"))  # fmt: skip
        else:
            from transformers import AutoModelForCausalLM

            from icl_circuits.models import gguf, model_info

            info = model_info(model)
            is_gguf = info.kind == "gguf" and info.file is not None and info.sha256 is not None
            folder = gguf.dequantised_dir(Path(str(info.file)), str(info.sha256)) if is_gguf else None
            if folder is None:
                rows.append(BenchRow("real", "  same, nnsight loop", ours_s, "nnsight", None,
                                     f"SKIPPED: the nnsight row needs a GGUF-loaded model, got kind {info.kind!r}"))
            else:
                hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
                lm = NNsight(hf)
                t, mb = [], []
                with _measured(t, mb):
                    theirs = _nnsight_head_patching(lm, clean, corrupted, subset, d_head, answer, contrast, last)
                gap = float((ours_sub - theirs).abs().max())
                rows.append(BenchRow("real", "  same, nnsight loop", ours_s, "nnsight trace per head", t[0] * H,
                                     f"nnsight ESTIMATE: {len(subset)} heads x {H}; max |ours - nnsight| {gap:.1e} "
                                     "logits (HF weights, unfolded)", ours_mb, mb[0]))  # fmt: skip
                del lm, hf
    return rows + _real_atp_rows(model, pairs, quick, ours)


def _real_pairs(model: Any) -> Any:
    """The real-model patching inputs: ``country-capital``, 4 pairs of 4-shot prompts, demo labels shuffled."""
    from icl_circuits.tasks.pairs import patching_batch
    from icl_circuits.tasks.registry import get_task

    return patching_batch(model, get_task("country-capital", model), 4, 4, 0, corruption="shuffled_labels")


def _real_atp_rows(model: Any, pairs: Any, quick: bool, exact: Any = None) -> list[BenchRow]:
    """AtP (``graddrop=False``) against TransformerLens's ``tools.analysis.attribution_patch`` (one clean forward +
    one corrupted forward/backward per example, node scores of ``hook_z`` summed over positions), then AtP*;
    with ``exact`` (exact head patching of the same pairs) the estimators' agreement with it."""
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attribution_patch

    from icl_circuits.patching.atp import attribution_patch

    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    clean, corrupted = pairs.clean_tokens, pairs.corrupted_tokens
    answer, contrast, last = pairs.answer_tokens, pairs.contrast_tokens, pairs.last_positions
    rows: list[BenchRow] = []
    t: list[float] = []
    mb: list[float | None] = []
    with _measured(t, mb):
        atp = attribution_patch(model, clean, corrupted, answer, contrast, "z", answer_positions=last, graddrop=False)
    atp_s, atp_mb = t[0], mb[0]
    if not quick:
        scores = torch.zeros(L, H)
        t, mb = [], []
        with _measured(t, mb):  # its metric sees one example's logits: call it per example, as it loops itself
            for b in range(clean.shape[0]):
                a_b, c_b, p_b = int(answer[b]), int(contrast[b]), int(last[b])

                def metric_b(lg: torch.Tensor, a_b: int = a_b, c_b: int = c_b, p_b: int = p_b) -> torch.Tensor:
                    return lg[0, p_b, a_b] - lg[0, p_b, c_b]

                ref = tl_attribution_patch(model, clean[b : b + 1], corrupted[b : b + 1], metric_b)
                for node, v in ref.node_scores.items():
                    if node.kind == "attn_head_out":
                        scores[node.layer, node.head] += v / clean.shape[0]
        gap = float((atp.atp.mean(-1) - scores).abs().max())
        rows.append(BenchRow("real", "AtP, heads", atp_s, "tools.analysis.attribution_patch", t[0],
                             f"max |ours - TL| {gap:.1e} logits (z nodes summed over positions)", atp_mb, mb[0]))
    else:
        rows.append(BenchRow("real", "AtP, heads", atp_s, "", None, "", atp_mb))
    t, mb = [], []
    with _measured(t, mb):
        star = attribution_patch(model, clean, corrupted, answer, contrast, "z", answer_positions=last)
    corr = ""
    if exact is not None:
        agree = star.agreement(exact)
        corr = "; vs exact: " + "; ".join(f"{k} r={v:.2f} rho={agree.spearman[k]:.2f}"
                                          for k, v in agree.pearson.items())  # fmt: skip
    rows.append(BenchRow("real", f"AtP* (QK fix + GradDrop, {L} extra backwards)", t[0], "", None,
                         f"no TransformerLens counterpart{corr}", mb[0]))  # fmt: skip
    return rows


def bench_real_atp(model: Any, quick: bool = False) -> list[BenchRow]:
    """Only the AtP and AtP* rows of :func:`bench_real_patching` (same inputs), without the long exact-patching
    peers (~20 min): AtP against TransformerLens's ``attribution_patch``, AtP* alone. ``quick``: ours only."""
    return _real_atp_rows(model, _real_pairs(model), quick)


def bench_real_precision(model: Any, quick: bool = False) -> list[BenchRow]:
    """The mean-ablation sweep of one middle layer's heads (4 x ``[BOS?, r, r]``, ``|r| = 20``, the scan's
    sequences) at torch's float32 matmul precision ``"highest"`` against ``"medium"`` (on CPUs with
    AVX512-BF16, oneDNN's bfloat16-based float32 GEMMs), back to back in this process; the reference column
    is ``"highest"``. ``quick``: one run each instead of two (the row keeps the faster of each).
    """
    from icl_circuits.heads import scores as hd
    from icl_circuits.io import generator
    from icl_circuits.patching.ablation import InContextGain, mean_ablation_sweep

    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    layer = L // 2
    tokens = hd.repeated_random_tokens(model, 16, 20, generator(0))[:4]
    heads = [(layer, h) for h in range(H)]
    times: dict[str, list[float]] = {"highest": [], "medium": []}
    effects: dict[str, torch.Tensor] = {}
    for precision in ("highest", "medium") * (1 if quick else 2):
        with _timer(times[precision]):
            sweep = mean_ablation_sweep(model, tokens, InContextGain(tokens, 20), heads=heads,
                                        pattern_score=lambda p: hd.induction_stripe(p, 20),
                                        matmul_precision=precision)  # fmt: skip
        effects[precision] = sweep.effect[layer]
    gap = float((effects["medium"] - effects["highest"]).abs().max())
    rows = [BenchRow("real", f"sweep of L{layer}'s {H} heads x 4 seqs, float32 'medium'", min(times["medium"]),
                     "same at 'highest'", min(times["highest"]),
                     f"max |medium - highest| {gap:.1e} nats (max |effect| "
                     f"{float(effects['highest'].abs().max()):.3f}); best of {len(times['medium'])}")]  # fmt: skip
    if quick:
        return rows
    import pandas as pd
    from transformer_lens import patching

    mean_cache, metric = _tl_mean_ablation(model, tokens, 20)

    tl: list[float] = []
    index = pd.DataFrame(heads, columns=["layer", "head"])
    for _ in range(2):  # after the sweeps above; both at torch's default precision
        with _timer(tl), torch.no_grad():
            theirs = patching.generic_activation_patch(model, tokens, mean_cache, metric,
                                                       patching.layer_head_vector_patch_setter, "z", index_df=index)
    with torch.no_grad():
        clean = -hd.in_context_score(model(tokens).detach(), tokens, 20)
    gap = float((effects["highest"] - (theirs.float() - clean)).abs().max())
    rows.append(BenchRow("real", f"sweep of L{layer}'s {H} heads x 4 seqs, 'highest'", min(times["highest"]),
                         "generic_activation_patch (z)", min(tl),
                         f"equal precision, same heads; max |ours - TL| {gap:.1e} nats; best of 2 each"))  # fmt: skip
    return rows


REAL_BENCHMARKS: list[Callable[[Any, bool], list[BenchRow]]] = [
    bench_real_precision, bench_real_patching, bench_real_atp, bench_real_head_scan,
]  # fmt: skip


BENCHMARKS: list[Callable[[bool], list[BenchRow]]] = [
    bench_head_scan, bench_fast_weights, bench_patching, bench_analyses,
]  # fmt: skip
#: parts of another benchmark, run only when named (``real_atp``: the AtP rows of ``real_patching``, without its
#: ~20 min of exact-patching peers); a default run (no names) would otherwise time them twice
SUBSET_BENCHMARKS = ("real_atp",)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m icl_circuits.bench", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="benchmarks to run (default: all), e.g. head_scan")
    p.add_argument("--quick", action="store_true", help="let benchmarks cut their slowest part (noted per row)")
    p.add_argument("--model", default=None,
                   help="instead: the real-model rows on this model, e.g. smollm2-135m (head scan, exact "
                        "patching, AtP, AtP* against TransformerLens and nnsight; ~1 h on 2 busy cores)")  # fmt: skip
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs visible")
    header = (f"{'benchmark':<12} {'what':<48} {'ours s':>8} {'ref s':>8} {'ref/ours':>8} {'ours MB':>8} "
              f"{'ref MB':>8}  reference; note")  # fmt: skip
    printed = [False]

    def show(rows: list[BenchRow]) -> None:  # rows as each benchmark finishes: a long run shows progress
        if not printed[0]:
            print(header)
            print("-" * len(header))
            printed[0] = True
        for r in rows:
            ref = "" if r.reference_s is None else f"{r.reference_s:8.2f}"
            ratio = "" if r.ratio is None else f"{r.ratio:8.2f}"
            o_mb = "" if r.ours_mb is None else f"{r.ours_mb:8.0f}"
            r_mb = "" if r.reference_mb is None else f"{r.reference_mb:8.0f}"
            print(f"{r.benchmark:<12} {r.what:<48} {r.ours_s:8.2f} {ref:>8} {ratio:>8} {o_mb:>8} {r_mb:>8}  "
                  f"{r.reference}; {r.note}", flush=True)

    if args.model is not None:
        from icl_circuits.models import load_model

        try:
            import nnsight  # noqa: F401
        except ImportError:
            print("nnsight is NOT installed: its rows are skipped (pip install -e '.[peers]')")
        t: list[float] = []
        mb: list[float | None] = []
        with _measured(t, mb):
            model = load_model(args.model, device="cpu")
        show([BenchRow("real", f"load {args.model}", t[0], "", None, "float32; GGUF dequantised once, cached",
                       mb[0])])  # fmt: skip
        for real in REAL_BENCHMARKS:
            name = real.__name__.removeprefix("bench_")
            if (name in args.names) if args.names else (name not in SUBSET_BENCHMARKS):
                show(real(model, args.quick))
    else:
        for bench in BENCHMARKS:
            if not args.names or bench.__name__.removeprefix("bench_") in args.names:
                show(bench(args.quick))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
