"""Function-vector heads: the causal indirect effect of each head's mean task output (Todd et al. 2024).

Setting (Todd, Li, Sharma, Mueller, Wallace & Bau 2024, "Function Vectors in Large Language Models",
ICLR, §2.1). For a task ``t``: clean few-shot prompts ``P_t`` and corrupted ones ``P~_t``, the same
prompts with the demo labels shuffled (:func:`icl_circuits.tasks.pairs.patching_batch`,
``corruption="shuffled_labels"``: the input-output mapping is destroyed, the format kept). A head's
**mean output** at the last position (where the answer is predicted) over the clean prompts::

    mean_z[l, h] = 1/|P_t| sum_{p in P_t} z_{l,h}(p)[last]        [layer, head, d_head]

(``blocks.{l}.attn.hook_z``, per head, before ``W_O``; its contribution to the residual stream is
``mean_z[l, h] @ W_O[l, h]``). The **causal indirect effect** of head ``(l, h)`` on a corrupted prompt
``p~`` with answer ``y`` (first token) is the rise of the answer's probability when that head's output at
the last position is replaced by its clean mean::

    CIE(l, h | p~) = P(y | p~, z_{l,h}[last] := mean_z[l, h]) - P(y | p~)

and the **average indirect effect** ``AIE(l, h)`` is its mean over the prompts of a task (``cie [task,
layer, head]``) and then over tasks (``aie [layer, head]``). The heads with the largest AIE are the
function-vector heads; the sum of their mean outputs is the function vector
``FV = sum_{(l,h) in A} mean_z[l, h] @ W_O[l, h]`` (:func:`function_vector`).

Here the mean is taken over the same ``n`` clean prompts whose shuffled versions are patched (Todd et al.
average over a separate set of clean prompts). :meth:`FunctionVectorHeads.overlap_with` compares the
top-AIE heads with another head score, e.g. induction scores from :func:`icl_circuits.heads.scan.scan_heads`,
to test Yin & Steinhardt (ICML 2025, "Which Attention Heads Matter for In-Context Learning?"): are the
function-vector heads the induction heads?

Cost: per task two unpatched forwards (clean, corrupted) and, per layer ``l``, one forward of
``n_heads * n`` tiled sequences resumed at block ``l`` (:mod:`icl_circuits.patching.resume`; at most ``max_rows``
sequences per forward), with the unembedding only at the last position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from icl_circuits.errors import InputError
from icl_circuits.patching.atp import spearman
from icl_circuits.patching.resume import BaseRun, capture_run, fused_activations, unembed
from icl_circuits.results import Result, renamed_kwargs
from icl_circuits.shapes import Head, check_heads
from icl_circuits.tasks.registry import Task, get_task


def _label(head: Head) -> str:
    return f"L{head[0]}H{head[1]}"


@dataclass(frozen=True)
class FunctionVectorHeads(Result):
    """Causal indirect effects of every head, per task and prompt, with the clean mean outputs.

    ``cie_per_prompt [task, layer, head, prompt]``: ``P_patched(answer) - P_corrupted(answer)``;
    ``p_clean`` and ``p_corrupted [task, prompt]``: the answer's probability on the unpatched prompts;
    ``mean_z [task, layer, head, d_head]``: each head's mean output at the last position of the clean prompts.
    """

    tasks: tuple[str, ...]
    cie_per_prompt: torch.Tensor
    p_clean: torch.Tensor
    p_corrupted: torch.Tensor
    mean_z: torch.Tensor
    n_shots: int
    seed: int

    title = "Function-vector heads"

    @property
    def cie(self) -> torch.Tensor:
        """``[task, layer, head]``: the mean CIE over each task's prompts."""
        return self.cie_per_prompt.mean(-1)

    @property
    def aie(self) -> torch.Tensor:
        """``[layer, head]``: the average indirect effect, the mean of :attr:`cie` over tasks."""
        return self.cie.mean(0)

    @property
    def n_layers(self) -> int:
        return int(self.cie_per_prompt.shape[1])

    @property
    def n_heads(self) -> int:
        return int(self.cie_per_prompt.shape[2])

    def top(self, k: int = 10) -> list[Head]:
        """The ``k`` heads with the largest AIE, largest first."""
        return _top(self.aie, k)

    def overlap_with(self, scores: torch.Tensor, k: int = 10) -> dict[str, Any]:
        """Compare the top-``k`` AIE heads with the top-``k`` heads by ``scores [layer, head]`` (e.g. induction).

        Returns ``{"k", "fv_heads", "other_heads", "overlap", "fraction" (|overlap| / k), "spearman"}``;
        ``spearman`` is the rank correlation of AIE and ``scores`` over all heads (ties share ranks).
        """
        scores = torch.as_tensor(scores).detach().cpu()
        if tuple(scores.shape) != tuple(self.aie.shape):
            raise InputError(f"scores must be [layer, head] = {list(self.aie.shape)}, got {list(scores.shape)}")
        fv, other = self.top(k), _top(scores, k)
        shared = [h for h in fv if h in set(other)]
        return {"k": k, "fv_heads": fv, "other_heads": other, "overlap": shared, "fraction": len(shared) / k,
                "spearman": spearman(self.aie, scores.float())}  # fmt: skip

    def to_dataframe(self) -> Any:
        """One row per head, by AIE (largest first): ``layer``, ``head``, ``aie``, ``rank``, ``cie[TASK]`` per task."""
        import pandas as pd

        aie, cie = self.aie, self.cie
        rows = [
            {"layer": l, "head": h, "aie": float(aie[l, h]),
             **{f"cie[{t}]": float(cie[i, l, h]) for i, t in enumerate(self.tasks)}}
            for l in range(self.n_layers) for h in range(self.n_heads)
        ]  # fmt: skip
        df = pd.DataFrame(rows).sort_values("aie", ascending=False, kind="stable").reset_index(drop=True)
        df.insert(3, "rank", range(1, len(df) + 1))
        return df

    def plot(self) -> Any:
        """A plotly heatmap of the AIE, layer x head."""
        import plotly.graph_objects as go

        z = self.aie.detach().float()
        bound = float(z.abs().max()) or 1.0
        fig = go.Figure(go.Heatmap(z=z.numpy(), y=[f"L{l}" for l in range(self.n_layers)],
                                   x=[f"H{h}" for h in range(self.n_heads)], colorscale="RdBu",
                                   zmid=0.0, zmin=-bound, zmax=bound, colorbar={"title": "AIE"}))  # fmt: skip
        fig.update_layout(
            title=f"Average indirect effect of each head's mean output (shuffled-label prompts, {self.n_shots} shots, "
            f"{len(self.tasks)} task(s)): rise in P(answer)",
            xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed",
        )  # fmt: skip
        return fig

    def summary(self) -> str:
        aie = self.aie
        best = ", ".join(f"{_label(h)}: {float(aie[h]):+.4f}" for h in self.top(5))
        return (
            f"function-vector heads over {len(self.tasks)} task(s) ({', '.join(self.tasks)}), {self.n_shots} shots, "
            f"{self.cie_per_prompt.shape[-1]} prompts each; P(answer) clean {float(self.p_clean.mean()):.3f}, "
            f"shuffled labels {float(self.p_corrupted.mean()):.3f}; largest AIE {best}"
        )

    def _repr_html_(self) -> str:
        import html

        from icl_circuits.report import table_html

        return f"<div><pre>{html.escape(self.summary())}</pre>{table_html(self.to_dataframe(), max_rows=12)}</div>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks), "n_shots": self.n_shots, "seed": self.seed,
            "aie": self.aie.tolist(), "cie": self.cie.tolist(), "cie_per_prompt": self.cie_per_prompt.tolist(),
            "p_clean": self.p_clean.tolist(), "p_corrupted": self.p_corrupted.tolist(),
            "top": [list(h) for h in self.top(min(10, self.aie.numel()))],
        }  # fmt: skip


def _top(scores: torch.Tensor, k: int) -> list[Head]:
    n_heads = int(scores.shape[1])
    if not 1 <= k <= scores.numel():
        raise InputError(f"k must be in 1..{scores.numel()} (the number of heads), got {k}")
    idx = torch.topk(scores.reshape(-1).double(), k).indices
    return [divmod(int(i), n_heads) for i in idx]


def function_vector(model: Any, heads: Sequence[Head], mean_z: torch.Tensor) -> torch.Tensor:
    """``[d_model]``: ``sum_{(l,h) in heads} mean_z[l, h] @ W_O[l, h]`` (Todd et al.'s function vector).

    ``mean_z [layer, head, d_head]``, e.g. ``FunctionVectorHeads.mean_z[task]``; ``b_O`` is not per head
    and not included.
    """
    w_o = model.W_O.detach()  # [layer, head, d_head, d_model]
    if tuple(mean_z.shape) != tuple(w_o.shape[:3]):
        raise InputError(f"mean_z must be [layer, head, d_head] = {list(w_o.shape[:3])}, got {list(mean_z.shape)}")
    out = torch.zeros(w_o.shape[-1], dtype=w_o.dtype, device=w_o.device)
    for l, h in check_heads(heads, w_o.shape[0], w_o.shape[1], allow_empty=False):
        out += mean_z[l, h].to(w_o) @ w_o[l, h]
    return out


def _answer_probs(
    run: BaseRun, answer_tokens: torch.Tensor, layer: int, x: torch.Tensor, hooks: Sequence[tuple[str, Any]] = ()
) -> torch.Tensor:
    """Resume ``run`` at block ``layer`` on ``x [n * batch, pos, d_model]``: ``P(answer)`` at the answer
    position, ``[n * batch]``, from the final normed residual there (captured from ``ln_final``)."""
    model = run.model
    seen: list[torch.Tensor] = []
    handle = model.ln_final.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        run.logit_diff_from(layer, x, hooks)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise InputError(f"the final norm ran {len(seen)} times in a resumed run; cannot read probabilities")
    normed = seen[0].reshape(x.shape[0], -1).detach()  # [rows, d_model]
    logits = unembed(model, normed)  # W_U, b_U and any final-logit soft-cap
    n = x.shape[0] // run.batch
    return torch.softmax(logits.float(), dim=-1)[torch.arange(x.shape[0]), answer_tokens.repeat(n)]


def _capture(model: Any, tokens: torch.Tensor, answer_tokens: torch.Tensor, positions: torch.Tensor) -> BaseRun:
    """An unpatched run caching every ``hook_z``; verified resumable (``check``)."""
    names = [f"blocks.{l}.attn.hook_z" for l in range(int(model.cfg.n_layers))]
    contrast = (answer_tokens + 1) % int(model.cfg.d_vocab)  # any other token: the resume check compares logit diffs
    run = capture_run(model, tokens, names, answer_tokens, contrast, positions)
    run.check()
    return run


def _check_batch(model: Any, tokens: torch.Tensor, answer_tokens: torch.Tensor, positions: torch.Tensor) -> None:
    if getattr(model, "training", False):
        raise InputError("the model is in training mode (dropout would differ between runs); call model.eval()")
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2 or tokens.is_floating_point():
        raise InputError(f"tokens must be an integer tensor [batch, pos], got {getattr(tokens, 'shape', type(tokens))}")
    batch, n_pos = tokens.shape
    if answer_tokens.shape != (batch,) or int(answer_tokens.min()) < 0 or int(answer_tokens.max()) >= model.cfg.d_vocab:
        raise InputError(f"answer_tokens must be [batch={batch}] token ids of the vocabulary")
    if positions.shape != (batch,) or int(positions.min()) < 0 or int(positions.max()) >= n_pos:
        raise InputError(f"positions must be [batch={batch}] with values in 0..{n_pos - 1}")


def head_mean_patch(
    model: Any,
    tokens: torch.Tensor,
    answer_tokens: torch.Tensor,
    positions: torch.Tensor,
    mean_z: torch.Tensor,
    *,
    max_rows: int = 256,
    fast_activations: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set each head's output at ``positions`` to ``mean_z``, one head at a time: ``P(answer)`` of every run.

    Args:
        tokens: ``[batch, pos]`` (the corrupted prompts); ``answer_tokens``, ``positions``: ``[batch]``.
        mean_z: ``[layer, head, d_head]``, the value written into ``blocks.{l}.attn.hook_z[b, positions[b], h]``.

    Returns:
        ``(p_patched [layer, head, batch], p_base [batch])``; ``CIE = p_patched - p_base``.
    """
    _check_batch(model, tokens, answer_tokens, positions)
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    with fused_activations(model, fast_activations):
        run = _capture(model, tokens, answer_tokens, positions)
        d_head = int(run.acts["blocks.0.attn.hook_z"].shape[-1])
        if tuple(mean_z.shape) != (n_layers, n_heads, d_head):
            raise InputError(f"mean_z must be [layer, head, d_head] = {[n_layers, n_heads, d_head]}, "
                             f"got {list(mean_z.shape)}")  # fmt: skip
        last = n_layers - 1
        p_base = _answer_probs(run, answer_tokens, last, run.resid(last))
        batch = run.batch
        per_chunk = max(1, max_rows // batch)
        jobs = [(l, list(range(j, min(j + per_chunk, n_heads)))) for l in range(n_layers)
                for j in range(0, n_heads, per_chunk)]  # fmt: skip
        out = torch.empty(n_layers, n_heads, batch, device=p_base.device)  # the model's device
        rows = torch.arange(batch)
        for l, heads in tqdm(jobs, desc="mean-output patching", unit="fwd", disable=not progress):
            value = mean_z[l].to(run.acts[f"blocks.{l}.attn.hook_z"])

            def hook(z: torch.Tensor, hook: Any, heads: list[int] = heads, value: torch.Tensor = value) -> torch.Tensor:
                z = z.clone()
                for i, h in enumerate(heads):
                    z[i * batch + rows, positions, h] = value[h]
                return z

            x = run.resid(l).repeat(len(heads), 1, 1)
            probs = _answer_probs(run, answer_tokens, l, x, [(f"blocks.{l}.attn.hook_z", hook)])
            out[l, heads] = probs.reshape(len(heads), batch)
    return out, p_base


@renamed_kwargs(n_shots="shots")
def function_vector_heads(
    model: Any,
    tasks: Sequence[str | Task],
    *,
    shots: int = 8,
    n: int = 25,
    seed: int = 0,
    max_rows: int = 256,
    fast_activations: bool = True,
    progress: bool = False,
) -> FunctionVectorHeads:
    """Todd et al.'s causal indirect effect of every head on every task; see the module docstring.

    Per task (a name or a :class:`Task`), ``n`` clean prompts with ``shots`` demos and their shuffled-label
    versions come from :func:`icl_circuits.tasks.pairs.patching_batch` (``seed``); ``mean_z`` is taken at each
    clean prompt's last position and patched at the corrupted prompt's last position.

    Raises:
        InputError: no tasks, a model in training mode, or a model whose blocks cannot be resumed.
        TaskError, TokenizationError: from building the prompts (e.g. ``shots < 2``).
    """
    from icl_circuits.tasks.pairs import patching_batch

    if not tasks:
        raise InputError("tasks is empty: give at least one task")
    names, cie, p_clean, p_corrupted, means = [], [], [], [], []
    for task in tqdm(tasks, desc="function-vector tasks", unit="task", disable=not progress):
        pairs = patching_batch(model, get_task(task, model), shots, n, seed, corruption="shuffled_labels")
        _check_batch(model, pairs.clean_tokens, pairs.answer_tokens, pairs.last_positions)
        with fused_activations(model, fast_activations):
            clean = _capture(model, pairs.clean_tokens, pairs.answer_tokens, pairs.last_positions)
            last = clean.n_layers - 1
            p_clean.append(_answer_probs(clean, pairs.answer_tokens, last, clean.resid(last)))
        rows = torch.arange(clean.batch)
        mean_z = torch.stack([clean.acts[f"blocks.{l}.attn.hook_z"][rows, pairs.last_positions].mean(0)
                              for l in range(clean.n_layers)])  # [layer, head, d_head]  # fmt: skip
        patched, base = head_mean_patch(model, pairs.corrupted_tokens, pairs.answer_tokens, pairs.last_positions,
                                        mean_z, max_rows=max_rows, fast_activations=fast_activations)  # fmt: skip
        names.append(pairs.task)
        cie.append(patched - base)
        p_corrupted.append(base)
        means.append(mean_z.float().cpu())
    return FunctionVectorHeads(
        tasks=tuple(names),
        cie_per_prompt=torch.stack(cie).float().cpu(),
        p_clean=torch.stack(p_clean).float().cpu(),
        p_corrupted=torch.stack(p_corrupted).float().cpu(),
        mean_z=torch.stack(means),
        n_shots=shots,
        seed=seed,
    )
