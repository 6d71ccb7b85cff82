"""Mean ablation of attention heads on few-shot prompts, through hooks on ``blocks.{l}.attn.hook_z``.

A head's output at layer ``l`` is ``z[b, t, h] @ W_O[l, h]``; mean-ablating head ``h`` replaces
``z[b, t, h]`` at every position ``t`` by ``mean_z[t, h]``, its mean over the reference prompts that
reach position ``t`` (right-padded prompts: a prompt shorter than ``t`` does not count; with prompts
of one length this is the per-position batch mean, as TransformerLens's ``generic_activation_patch``
with ``layer_head_vector_patch_setter`` and a cache of means). Several heads are ablated at once
(one hook per layer, inside ``model.hooks(...)``, removed afterwards).

:func:`head_ablation_effects` ablates one head at a time and reports, per head, the change of the
mean logit difference ``LD = logit[answer] - logit[contrast]``: ``effect = LD_ablated - LD_clean``
(negative: the head supports the answer). Cost: one forward of the prompts for the means, then one
per ablated set; the sweep resumes each ablated run at the head's layer and reads one logit column
(:mod:`icl_circuits.patching.resume`), several heads per forward: about ``H * sum_l (L - l) / L`` batch
forwards of the upper layers instead of ``L * H`` full ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from icl_circuits.analyze.base import answer_logits, batch_chunks, padded_batch
from icl_circuits.errors import InputError

Head = tuple[int, int]


def check_heads(model: Any, heads: Sequence[Head]) -> list[Head]:
    """Validated, de-duplicated ``(layer, head)`` pairs."""
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    out = [(int(l), int(h)) for l, h in heads]
    bad = [x for x in out if not (0 <= x[0] < L and 0 <= x[1] < H)]
    if bad:
        raise InputError(f"heads {bad} are not in the model ({L} layers x {H} heads)")
    return list(dict.fromkeys(out))


@torch.no_grad()
def mean_z(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    last_positions: torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
) -> dict[int, torch.Tensor]:
    """``{layer: [pos, n_heads, d_head]}``: ``hook_z`` averaged over the prompts that reach each position."""
    padded, last = padded_batch(model, tokens, last_positions)
    layers = range(int(model.cfg.n_layers)) if layers is None else layers
    names = {f"blocks.{l}.attn.hook_z": l for l in layers}
    device = getattr(model.cfg, "device", None) or "cpu"
    width = padded.shape[1]
    sums: dict[int, torch.Tensor] = {}
    count = torch.zeros(width)
    for _, chunk, pos in batch_chunks(padded, last, batch_size):
        _, cache = model.run_with_cache(chunk.to(device), names_filter=lambda n: n in names)
        active = (torch.arange(chunk.shape[1])[None] <= pos[:, None]).float()  # [b, width_chunk]
        count[: chunk.shape[1]] += active.sum(0)
        for n, l in names.items():
            part = torch.einsum("bp,bphe->phe", active, cache[n].float().cpu())
            total = sums.setdefault(l, torch.zeros(width, *part.shape[1:]))
            total[: chunk.shape[1]] += part
    return {l: t / count.clamp_min(1.0)[:, None, None] for l, t in sums.items()}


def ablation_hooks(heads: Sequence[Head], means: dict[int, torch.Tensor]) -> list[tuple[str, Any]]:
    """Forward hooks (for ``model.hooks``) that set ``z[:, t, h] = means[l][t, h]`` for every ablated head."""
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    missing = [l for l in by_layer if l not in means]
    if missing:
        raise InputError(f"no mean activations for layers {missing}")

    def make(l: int, hs: list[int]) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            z = z.clone()
            z[:, :, hs] = means[l][: z.shape[1], hs].to(z.device, z.dtype)
            return z

        return hook

    return [(f"blocks.{l}.attn.hook_z", make(l, hs)) for l, hs in by_layer.items()]


def ablated_logits(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    heads: Sequence[Head],
    *,
    last_positions: torch.Tensor | None = None,
    means: dict[int, torch.Tensor] | None = None,
    batch_size: int = 32,
) -> torch.Tensor:
    """``[batch, d_vocab]`` logits at the last positions with ``heads`` mean-ablated (means of ``tokens``
    themselves unless ``means`` is given, e.g. from other prompts; they must cover the positions)."""
    heads = check_heads(model, heads)
    if not heads:
        return answer_logits(model, tokens, last_positions, batch_size=batch_size)
    if means is None:
        means = mean_z(model, tokens, last_positions, sorted({l for l, _ in heads}), batch_size=batch_size)
    return answer_logits(model, tokens, last_positions, batch_size=batch_size, fwd_hooks=ablation_hooks(heads, means))


def head_ablation_effects(
    model: Any,
    tokens: Sequence[Sequence[int]] | torch.Tensor,
    answer_ids: torch.Tensor,
    contrast_ids: torch.Tensor,
    *,
    last_positions: torch.Tensor | None = None,
    heads: Sequence[Head] | None = None,
    batch_size: int = 32,
    max_rows: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """``[layer, head]``: mean ``LD`` with that one head mean-ablated minus the clean mean ``LD``
    (``heads``: sweep only these; the others are 0).

    The ablated runs start at the head's layer from the cached clean residual and read only the
    answer-minus-contrast logit (:mod:`icl_circuits.patching.resume`, the engine of exact patching), several
    heads per forward (at most ``max_rows`` sequences); for an architecture the resumed blocks do not
    reproduce (``BaseRun.check``), every ablation is a full forward instead.
    """
    from icl_circuits.patching.resume import capture_run

    padded, last = padded_batch(model, tokens, last_positions)
    L, H = int(model.cfg.n_layers), int(model.cfg.n_heads)
    todo = [(l, h) for l in range(L) for h in range(H)] if heads is None else check_heads(model, heads)
    layers = sorted({l for l, _ in todo})
    means = mean_z(model, padded, last, layers, batch_size=batch_size)
    device = getattr(model.cfg, "device", None) or "cpu"
    out = torch.zeros(L, H)
    base = capture_run(model, padded.to(device), [f"blocks.{l}.attn.hook_z" for l in layers], answer_ids.to(device),
                       contrast_ids.to(device), last.to(device))  # fmt: skip
    clean = float(base.logit_diff.mean())
    try:
        base.check()
    except InputError:  # blocks that cannot be resumed: one full forward per head
        for l, h in tqdm(todo, desc="head ablation", disable=not progress):
            final = ablated_logits(model, padded, [(l, h)], last_positions=last, means=means, batch_size=batch_size)
            rows = torch.arange(len(answer_ids))
            out[l, h] = float((final[rows, answer_ids] - final[rows, contrast_ids]).mean()) - clean
        return out
    B = base.batch
    per = max(1, max_rows // B)
    jobs = [(l, hs[i : i + per]) for l in layers for hs in [[h for ll, h in todo if ll == l]]
            for i in range(0, len(hs), per)]  # fmt: skip
    for l, chunk in tqdm(jobs, desc="head ablation", unit="fwd", disable=not progress):

        def hook(z: torch.Tensor, hook: Any, l: int = l, chunk: list[int] = chunk) -> torch.Tensor:
            z = z.clone()
            for k, h in enumerate(chunk):
                z[k * B : (k + 1) * B, :, h] = means[l][: z.shape[1], h].to(z.device, z.dtype)
            return z

        x = base.resid(l).repeat(len(chunk), 1, 1)
        ld = base.logit_diff_from(l, x, [(f"blocks.{l}.attn.hook_z", hook)]).reshape(len(chunk), B).float().cpu()
        for k, h in enumerate(chunk):
            out[l, h] = float(ld[k].mean()) - clean
    return out
