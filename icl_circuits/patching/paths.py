"""Path patching between attention heads: how much of a head's effect flows through chosen receivers' inputs.

Setting (Wang et al. 2022, "Interpretability in the Wild", §3.1 and App. B; Goldowsky-Dill et al. 2023,
"Localizing Model Behavior with Path Patching"). Clean and corrupted prompts, ``LD = logit[answer] -
logit[contrast]`` at the answer position, base and source runs as in :mod:`icl_circuits.patching.exact`
(``"denoising"``: base = corrupted, source = clean; ``"noising"``: base = clean, source = corrupted).
For a **sender** head ``s = (l, h)`` and **receivers** ``R`` (heads, each read at its query, key or
value input ``X``), the path ``s -> X(R)`` is patched in two runs on the base tokens:

1. the sender's output ``z_s`` (``blocks.{l}.attn.hook_z``, before ``W_O``) set to the source run's, every
   other head's ``z`` in every layer frozen to the base run's (and, with ``freeze_mlps``, every
   ``hook_mlp_out`` too); each receiver's input ``X_r = ln1(resid_pre) W_X[r] + b_X[r]``
   (``blocks.{r}.attn.hook_{q|k|v}``, its head only) is recorded;
2. a fresh base run with only those receiver slices replaced by the recorded values; everything
   downstream of the receivers runs freely; ``LD`` is read.

The sender's change thus reaches the receivers directly (through the residual stream) and, unless
``freeze_mlps``, through the MLPs in between, but never through another head. With ``freeze_mlps``
run 1 is linear up to the receiver's LayerNorm: ``X_r = ln1(resid_pre_base[r] + (z_src - z_base)[s] W_O[s])
W_X[r] + b_X[r]`` (tested against exactly this formula).

Grid: ``("layer", "head")`` over the senders in layers ``0 .. max receiver layer - 1`` (a head can only
send to later layers; the grid has no rows for layers that cannot send). A sender feeds the receivers
in layers above its own; receivers in its own or earlier layers keep their base input. Cells left out by
``senders=`` (and senders whose source output equals the base output) hold the base run's ``LD``, i.e.
no effect. Values are normalised as in :class:`~icl_circuits.patching.exact.PatchEffects` (``method="path"``).
Every position of a receiver's input is patched (path patching over all positions).

Grouped-query models: the key and value of a receiver are those of a **key/value head** (index below
``n_key_value_heads``, shared by the query heads of its group), as in
:func:`~icl_circuits.patching.exact.activation_patch`.

Cost: the senders of one layer share a tiled forward (one copy of the batch per sender, at most
``max_rows`` sequences): run 1 goes from the sender's layer up to the deepest receiver's input, run 2 from
the first receiver's layer to the answer (both resumed from cached residuals, :mod:`icl_circuits.patching.resume`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from icl_circuits.errors import InputError
from icl_circuits.patching.exact import Direction, PatchEffects, check_inputs
from icl_circuits.patching.resume import BaseRun, capture_run, fused_activations
from icl_circuits.shapes import Head, check_heads, n_kv_heads

RECEIVER_INPUTS = ("q", "k", "v")
ReceiverInput = Literal["q", "k", "v"]


class _Captured(Exception):
    """Raised by run 1 once the deepest receiver's input is recorded (nothing after it is needed)."""


def _heads(name: str, heads: Any, n_layers: int, n_heads: int, what: str) -> list[Head]:
    """``heads`` as a de-duplicated list of ``(layer, head)`` in range; InputError naming ``name`` otherwise."""
    return check_heads(heads, n_layers, n_heads, what=name, unit=what, allow_empty=False)


def _n_receiver_heads(model: Any, receiver_input: str) -> tuple[int, str]:
    n_heads = int(model.cfg.n_heads)
    if receiver_input == "q":
        return n_heads, "query heads"
    n_kv = n_kv_heads(model)
    return n_kv, "key/value heads" if n_kv != n_heads else "heads"


def path_patch(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    answer_tokens: torch.Tensor,
    contrast_tokens: torch.Tensor,
    receivers: Sequence[Head],
    receiver_input: ReceiverInput,
    *,
    senders: Sequence[Head] | None = None,
    direction: Direction = "denoising",
    answer_positions: torch.Tensor | None = None,
    freeze_mlps: bool = False,
    max_rows: int = 256,
    fast_activations: bool = True,
    progress: bool = False,
) -> PatchEffects:
    """Path-patch every sender head into ``receivers``' ``receiver_input``: ``LD`` per sender and example.

    Args:
        clean_tokens, corrupted_tokens: ``[batch, pos]``, aligned position by position.
        answer_tokens, contrast_tokens: ``[batch]``; ``LD = logit[answer] - logit[contrast]``.
        receivers: ``(layer, head)`` pairs; for ``k``/``v`` on grouped-query models, key/value heads.
        receiver_input: ``"q"``, ``"k"`` or ``"v"``: which input of the receivers carries the path.
        senders: the sender heads to patch (default: every head below the deepest receiver's layer).
        direction: ``"denoising"`` (clean sender into the corrupted run) or ``"noising"``.
        answer_positions: ``[batch]`` where the answer is read; default the last position.
        freeze_mlps: also freeze every MLP output in run 1 (only the direct residual path remains).
        max_rows: most sequences in one tiled forward (senders x batch).
        fast_activations: fused tanh-GELU, as in
:func:`~icl_circuits.patching.exact.activation_patch`.

    Returns:
        :class:`~icl_circuits.patching.exact.PatchEffects` with grid ``("layer", "head")`` of shape
        ``[max receiver layer, n_heads, batch]``, ``method="path"``.

    Raises:
        InputError: malformed inputs (as activation patching), an unknown ``receiver_input``, receivers or
            senders outside the model, no head that can send (every receiver in layer 0), or a sender not
            below the deepest receiver.
    """
    if receiver_input not in RECEIVER_INPUTS:
        raise InputError(f"receiver_input must be one of {RECEIVER_INPUTS}, got {receiver_input!r}")
    if max_rows < 1:
        raise InputError(f"max_rows must be >= 1, got {max_rows}")
    positions = check_inputs(model, clean_tokens, corrupted_tokens, answer_tokens, contrast_tokens,
                             answer_positions, direction)  # fmt: skip
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    n_recv, what = _n_receiver_heads(model, receiver_input)
    recv = _heads("receivers", receivers, n_layers, n_recv, what)
    top = max(l for l, _ in recv)
    if top == 0:
        raise InputError("no valid senders: every receiver is in layer 0, and a sender must be in an earlier layer")
    if senders is None:
        send = [(l, h) for l in range(top) for h in range(n_heads)]
    else:
        send = _heads("senders", senders, n_layers, n_heads, "heads")
        late = [s for s in send if s[0] >= top]
        if late:
            raise InputError(f"senders {late} are not below the deepest receiver layer {top}; they cannot send to it")
    with fused_activations(model, fast_activations):
        return _sweep(model, clean_tokens, corrupted_tokens, answer_tokens, contrast_tokens, recv, receiver_input,
                      send, direction, positions, freeze_mlps, max_rows, progress)  # fmt: skip


def _z(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _mlp(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def _sweep(
    model: Any,
    clean_tokens: torch.Tensor,
    corrupted_tokens: torch.Tensor,
    answer_tokens: torch.Tensor,
    contrast_tokens: torch.Tensor,
    receivers: list[Head],
    receiver_input: str,
    senders: list[Head],
    direction: str,
    positions: torch.Tensor,
    freeze_mlps: bool,
    max_rows: int,
    progress: bool,
) -> PatchEffects:
    top = max(l for l, _ in receivers)
    recv_name = {l: f"blocks.{l}.attn.hook_{receiver_input}" for l, _ in receivers}
    names = [_z(l) for l in range(top)] + list(recv_name.values())
    names += [_mlp(l) for l in range(top)] if freeze_mlps else []
    clean = capture_run(model, clean_tokens, names, answer_tokens, contrast_tokens, positions)
    corrupted = capture_run(model, corrupted_tokens, names, answer_tokens, contrast_tokens, positions)
    base, source = (corrupted, clean) if direction == "denoising" else (clean, corrupted)
    base.check()
    for l, h in receivers:
        n_have = int(base.acts[recv_name[l]].shape[2])
        if h >= n_have:
            raise InputError(f"receiver L{l}H{h}: {recv_name[l]} has only {n_have} heads on this model")
    batch, n_heads = base.batch, int(model.cfg.n_heads)
    out = base.logit_diff.repeat(top, n_heads, 1)  # [layer, head, batch]; cells not run: no effect
    jobs: list[tuple[int, list[int]]] = []
    per_chunk = max(1, max_rows // batch)
    for l in range(top):
        todo = [h for s_l, h in senders if s_l == l and not torch.equal(source.acts[_z(l)][:, :, h],
                                                                          base.acts[_z(l)][:, :, h])]  # fmt: skip
        jobs += [(l, todo[j : j + per_chunk]) for j in range(0, len(todo), per_chunk)]
    for l, heads in tqdm(jobs, desc=f"path patching -> {receiver_input}", unit="fwd", disable=not progress):
        later = [r for r in receivers if r[0] > l]
        captured = _run_senders(base, source, l, heads, later, recv_name, top, freeze_mlps)
        out[l, heads] = _run_receivers(base, later, recv_name, captured, len(heads)).reshape(len(heads), batch)
    listed = ", ".join(f"L{l}H{h}" for l, h in receivers)
    return PatchEffects(
        activation=f"z -> {receiver_input} of {listed}" + (" (MLPs frozen)" if freeze_mlps else ""),
        direction=direction,
        axis_names=("layer", "head"),
        patched_logit_diff=out,
        clean_logit_diff=clean.logit_diff,
        corrupted_logit_diff=corrupted.logit_diff,
        method="path",
    )


def _run_senders(
    base: BaseRun,
    source: BaseRun,
    layer: int,
    heads: list[int],
    receivers: list[Head],
    recv_name: dict[int, str],
    top: int,
    freeze_mlps: bool,
) -> dict[Head, torch.Tensor]:
    """Run 1 for the senders ``(layer, h)``, one batch copy each: each receiver's input ``[n * batch, pos, d_head]``."""
    batch, n = base.batch, len(heads)
    deepest = max(l for l, _ in receivers)
    captured: dict[Head, torch.Tensor] = {}

    def freeze(l: int) -> Any:
        def hook(z: torch.Tensor, hook: Any) -> torch.Tensor:
            frozen = base.acts[_z(l)].repeat(n, 1, 1, 1)  # [n * batch, pos, head, d_head]
            if l == layer:
                for i, h in enumerate(heads):
                    frozen[i * batch : (i + 1) * batch, :, h] = source.acts[_z(l)][:, :, h]
            return frozen

        return hook

    def freeze_mlp(l: int) -> Any:
        def hook(mlp_out: torch.Tensor, hook: Any) -> torch.Tensor:
            return base.acts[_mlp(l)].repeat(n, 1, 1)

        return hook

    def record(l: int) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> None:
            for r_l, r_h in receivers:
                if r_l == l:
                    captured[(r_l, r_h)] = act[:, :, r_h].detach().clone()
            if l == deepest:
                raise _Captured

        return hook

    hooks = [(_z(l), freeze(l)) for l in range(layer, top)]
    hooks += [(_mlp(l), freeze_mlp(l)) for l in range(layer, top)] if freeze_mlps else []
    hooks += [(recv_name[l], record(l)) for l in sorted({l for l, _ in receivers})]
    try:
        base.logit_diff_from(layer, base.resid(layer).repeat(n, 1, 1), hooks, shortcut=False)
    except _Captured:
        pass
    missing = [r for r in receivers if r not in captured]
    if missing:
        raise InputError(f"the inputs of receivers {missing} were not recorded: their hook points did not fire")
    return captured


def _run_receivers(
    base: BaseRun, receivers: list[Head], recv_name: dict[int, str], captured: dict[Head, torch.Tensor], n: int
) -> torch.Tensor:
    """Run 2: the base run (``n`` copies) with each receiver's input slice replaced; ``LD [n * batch]``."""
    first = min(l for l, _ in receivers)

    def patch(l: int) -> Any:
        def hook(act: torch.Tensor, hook: Any) -> torch.Tensor:
            act = act.clone()
            for r_l, r_h in receivers:
                if r_l == l:
                    act[:, :, r_h] = captured[(r_l, r_h)]
            return act

        return hook

    hooks = [(recv_name[l], patch(l)) for l in sorted({l for l, _ in receivers})]
    return base.logit_diff_from(first, base.resid(first).repeat(n, 1, 1), hooks)
