"""The feature x architecture matrix: every feature on every tiny architecture, against an independent reference.

Each cell function takes a loaded model and its batch and returns ``(ours, reference)`` tensors (or raises a
project error naming what the architecture does not support). :func:`run_cell` turns that into a status:
``verified`` (max difference <= 1e-4 * (1 + max |reference|)), ``refused`` (an
:class:`~icl_circuits.errors.ICLCircuitsError`, message kept), ``MISMATCH`` (a silent wrong number) or
``ERROR`` (a raw exception). References are plain hooks and second forwards, or TransformerLens's own functions.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from icl_circuits.errors import ICLCircuitsError

TOL = 1e-4
Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Batch:
    clean: torch.Tensor
    corrupted: torch.Tensor
    answers: torch.Tensor
    contrasts: torch.Tensor
    last: torch.Tensor
    roles: Any


def make_batch(model: Any, n: int = 4, shots: int = 3, seed: int = 0) -> Batch:
    """``n`` clean/corrupted ``fixture-bound`` pairs (shuffled labels) and the clean prompts' roles."""
    from icl_circuits.models import bos_offset
    from icl_circuits.tasks.pairs import patching_batch
    from icl_circuits.tasks.registry import get_task
    from icl_circuits.tasks.roles import roles_from_tokens

    b = patching_batch(model, get_task("fixture-bound", model), shots, n, seed)
    roles = roles_from_tokens(b.clean_tokens, arrow_id=3, sep_id=4, last_positions=b.last_positions,
                             prefix_len=bos_offset(model))
    return Batch(b.clean_tokens, b.corrupted_tokens, b.answer_tokens, b.contrast_tokens, b.last_positions, roles)


# ---------------------------------------------------------------- references: plain hooks and second forwards


def _ld(model: Any, tokens: torch.Tensor, b: Batch, hooks: list[tuple[str, Any]] | None = None) -> torch.Tensor:
    """``[batch]`` logit difference from the model's real logits (a full forward under ``hooks``)."""
    rows = torch.arange(tokens.shape[0])
    with torch.no_grad(), model.hooks(fwd_hooks=hooks or []):
        logits = model(tokens)
    return (logits[rows, b.last, b.answers] - logits[rows, b.last, b.contrasts]).float()


def _cache(model: Any, tokens: torch.Tensor, names: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names)
    return {k: v.detach().clone() for k, v in cache.items()}


def _cache_all(
    model: Any, tokens: torch.Tensor, hooks: list[tuple[str, Any]], names: Callable[[str], bool]
) -> dict[str, torch.Tensor]:
    """The activations ``names`` of a forward under ``hooks``."""
    seen: dict[str, torch.Tensor] = {}

    def grab(t: torch.Tensor, hook: Any) -> None:
        seen[hook.name] = t.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, *((n, grab) for n in model.hook_dict if names(n))]):
        model(tokens)
    return seen


def _replace(name: str, value: torch.Tensor, index: tuple[Any, ...]) -> tuple[str, Any]:
    def hook(t: torch.Tensor, hook: Any) -> torch.Tensor:
        t = t.clone()
        t[index] = value[index]
        return t

    return name, hook


def _exact_reference(model: Any, b: Batch, act: str, per_position: bool) -> torch.Tensor:
    """Denoising patch of one cell at a time, each one full forward: ``[layer, (pos,) head or pos, batch]``."""
    names = {
        "z": "attn.hook_z",
        "q": "attn.hook_q",
        "k": "attn.hook_k",
        "v": "attn.hook_v",
        "resid_pre": "hook_resid_pre",
    }
    src = _cache(model, b.clean, lambda n: n.endswith(names[act]))
    out = []
    for l in range(model.cfg.n_layers):
        name = f"blocks.{l}.{names[act]}"
        s = src[name]
        if act == "resid_pre":
            out.append(torch.stack([_ld(model, b.corrupted, b, [_replace(name, s, (slice(None), p))])
                                    for p in range(s.shape[1])]))  # fmt: skip
        elif per_position:
            out.append(torch.stack([torch.stack([_ld(model, b.corrupted, b, [_replace(name, s, (slice(None), p, h))])
                                                 for h in range(s.shape[2])]) for p in range(s.shape[1])]))  # fmt: skip
        else:
            out.append(torch.stack([_ld(model, b.corrupted, b, [_replace(name, s, (slice(None), slice(None), h))])
                                    for h in range(s.shape[2])]))  # fmt: skip
    return torch.stack(out)


# ---------------------------------------------------------------- cells


def cell_scoring(model: Any, b: Batch) -> Pair:
    from icl_circuits.tasks.scoring import score_tokens

    s = score_tokens(model, b.clean, b.answers, b.contrasts, last_positions=b.last)
    return s.logit_diff.float().cpu(), _ld(model, b.clean, b).cpu()


def cell_head_scores(model: Any, b: Batch) -> Pair:
    from icl_circuits.heads.scores import attention_scores, repeated_random_tokens
    from icl_circuits.models import bos_offset

    g = torch.Generator().manual_seed(0)
    seq, o = 6, bos_offset(model)  # o = 1 with a BOS at position 0, else 0
    tokens = repeated_random_tokens(model, 2, seq, g)
    prefix = repeated_random_tokens(model, 2, seq, g, repeats=3)
    ours, _ = attention_scores(model, tokens, seq, prefix, 3)
    cache = _cache(model, tokens, lambda n: n.endswith("hook_pattern"))
    ref = []
    for l in range(model.cfg.n_layers):
        p = cache[f"blocks.{l}.attn.hook_pattern"].float()  # [batch, head, q, k]; query o+seq+i attends to o+i+1
        idx = torch.arange(seq)
        ref.append(p[:, :, o + seq + idx, o + 1 + idx].mean((0, 2)) if seq > 1 else p[:, :, 0, 0] * 0)
    return ours["induction"][:, :], torch.stack(ref).cpu()


def cell_composition(model: Any, b: Batch) -> Pair:
    from icl_circuits.heads.composition import composition_scores

    ours = torch.stack([composition_scores(model, m) for m in ("Q", "K", "V")])
    ref = torch.stack([model.all_composition_scores(m).detach().float().cpu() for m in ("Q", "K", "V")])
    return ours, ref


def cell_copying(model: Any, b: Batch) -> Pair:
    """OV copying scores against the eigenvalues of the dense full OV circuit ``W_E[S] (W_V W_O) W_U[:, S]``
    built from TransformerLens's own ``model.OV`` (its key/value-head expansion, not ours)."""
    from icl_circuits.heads.composition import copying_scores
    from icl_circuits.heads.scores import ordinary_token_ids

    ours = copying_scores(model)
    S = ordinary_token_ids(model).to(model.W_E.device)
    ov = model.OV.AB.detach().double()  # [layer, head, d_model, d_model]
    full = model.W_E.detach().double()[S] @ ov @ model.W_U.detach().double()[:, S]  # [layer, head, |S|, |S|]
    eig = torch.linalg.eigvals(full)
    return ours.float().cpu(), (eig.real.sum(-1) / eig.abs().sum(-1)).float().cpu()


def cell_mean_ablation(model: Any, b: Batch) -> Pair:
    from icl_circuits.patching.ablation import LogitDiff, mean_ablation_sweep

    metric = LogitDiff(b.answers, b.contrasts, b.last)
    ours = mean_ablation_sweep(model, b.clean, metric, last_positions=b.last).effect
    z = _cache(model, b.clean, lambda n: n.endswith("hook_z"))
    base = _ld(model, b.clean, b).mean()
    ref = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    active = (torch.arange(b.clean.shape[1])[None] <= b.last[:, None]).float()  # [batch, pos]
    for l in range(model.cfg.n_layers):
        zl = z[f"blocks.{l}.attn.hook_z"].float()
        mean = torch.einsum("bp,bphe->phe", active, zl) / active.sum(0).clamp_min(1)[:, None, None]

        for h in range(model.cfg.n_heads):

            def hook(t: torch.Tensor, hook: Any, h: int = h, mean: torch.Tensor = mean) -> torch.Tensor:
                t = t.clone()
                t[:, :, h] = mean[:, h]
                return t

            ref[l, h] = _ld(model, b.clean, b, [(f"blocks.{l}.attn.hook_z", hook)]).mean() - base
    return ours.float().cpu(), ref


def _exact(act: str, per_position: bool = False) -> Callable[[Any, Batch], Pair]:
    def cell(model: Any, b: Batch) -> Pair:
        from icl_circuits.patching.exact import activation_patch

        eff = activation_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, act, per_position=per_position,
                               answer_positions=b.last)  # fmt: skip
        return eff.patched_logit_diff.float().cpu(), _exact_reference(model, b, act, per_position).cpu()

    return cell


def _atp_grad_reference(model: Any, b: Batch, name_of: Callable[[int], str]) -> tuple[dict[int, torch.Tensor], ...]:
    """Base (corrupted) activations and ``dLD/da`` from the real logits, plus the clean activations."""
    acts: dict[int, torch.Tensor] = {}

    def keep(l: int) -> Any:
        def hook(t: torch.Tensor, hook: Any) -> torch.Tensor:
            acts[l] = t  # kept in the graph: the gradient also flows through later layers
            return t

        return hook

    rows = torch.arange(b.clean.shape[0])
    with torch.enable_grad(), model.hooks(fwd_hooks=[(name_of(l), keep(l)) for l in range(model.cfg.n_layers)]):
        logits = model(b.corrupted)
        ld = (logits[rows, b.last, b.answers] - logits[rows, b.last, b.contrasts]).sum()
        grads = torch.autograd.grad(ld, [acts[l] for l in range(model.cfg.n_layers)], allow_unused=True)
    grads = tuple(torch.zeros_like(acts[l]) if g is None else g for l, g in enumerate(grads))  # a cut layer: none
    src = _cache(model, b.clean, lambda n: n in {name_of(l) for l in range(model.cfg.n_layers)})
    return ({l: acts[l].detach() for l in acts}, dict(enumerate(grads)),
            {l: src[name_of(l)] for l in range(model.cfg.n_layers)})  # fmt: skip


def cell_atp(model: Any, b: Batch) -> Pair:
    """Plain AtP on head outputs ``z`` against ``(z_clean - z_corrupted) . dLD/dz`` from autograd on the logits."""
    from icl_circuits.patching.atp import attribution_patch

    res = attribution_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, "z", answer_positions=b.last,
                            graddrop=False)  # fmt: skip
    base, grad, src = _atp_grad_reference(model, b, lambda l: f"blocks.{l}.attn.hook_z")
    ref = torch.stack([((src[l] - base[l]) * grad[l]).sum((1, 3)) for l in range(model.cfg.n_layers)])
    return res.atp.float().cpu(), ref.movedim(1, -1).float().cpu()


def cell_atp_qk(model: Any, b: Batch) -> Pair:
    """AtP* QK fix on queries: ``sum (A' - A) dLD/dA`` with ``A'`` the pattern of a real forward with ``q`` patched."""
    from icl_circuits.patching.atp import attribution_patch

    res = attribution_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, "q", answer_positions=b.last,
                            graddrop=False)  # fmt: skip
    base, grad, _ = _atp_grad_reference(model, b, lambda l: f"blocks.{l}.attn.hook_pattern")
    srcq = _cache(model, b.clean, lambda n: n.endswith("attn.hook_q"))
    ref = torch.zeros(model.cfg.n_layers, model.cfg.n_heads, b.clean.shape[0])
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            name = f"blocks.{l}.attn.hook_q"
            pat = _cache_with(model, b.corrupted, f"blocks.{l}.attn.hook_pattern",
                              [_replace(name, srcq[name], (slice(None), slice(None), h))])  # fmt: skip
            ref[l, h] = ((pat - base[l]) * grad[l])[:, h].sum((-1, -2)).cpu()
    return res.atp_qk.float().cpu(), ref


def cell_atp_qk_keys(model: Any, b: Batch) -> Pair:
    """AtP* QK fix on keys (per key/value head, every key position at once): ``sum (A' - A) dLD/dA`` over the
    query heads that share the key head, ``A'`` the pattern of a real forward with that head's ``k`` patched."""
    from icl_circuits.patching.atp import attribution_patch

    res = attribution_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, "k", answer_positions=b.last,
                            graddrop=False)  # fmt: skip
    base, grad, _ = _atp_grad_reference(model, b, lambda l: f"blocks.{l}.attn.hook_pattern")
    srck = _cache(model, b.clean, lambda n: n.endswith("attn.hook_k"))
    n_kv = srck["blocks.0.attn.hook_k"].shape[2]
    ref = torch.zeros(model.cfg.n_layers, n_kv, b.clean.shape[0])
    for l in range(model.cfg.n_layers):
        for h in range(n_kv):
            name = f"blocks.{l}.attn.hook_k"
            pat = _cache_with(model, b.corrupted, f"blocks.{l}.attn.hook_pattern",
                              [_replace(name, srck[name], (slice(None), slice(None), h))])  # fmt: skip
            ref[l, h] = ((pat - base[l]) * grad[l]).sum((1, 2, 3)).cpu()  # other groups' patterns do not move
    return res.atp_qk.float().cpu(), ref


def cell_graddrop(model: Any, b: Batch) -> Pair:
    """AtP* GradDrop on head outputs per position: ``sum_l' |(z_clean - z_base) . dLD/dz|_{layer l' cut}| / (L-1)``,
    the gradients of forwards whose layer ``l'`` attention and MLP writes are detached (each detach checked to
    fire and to leave that layer's own heads without gradient)."""
    from icl_circuits.patching.atp import attribution_patch

    res = attribution_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, "z", per_position=True,
                            answer_positions=b.last)  # fmt: skip
    assert res.atp_star is not None
    n_layers = model.cfg.n_layers
    total = torch.zeros(res.atp_star.shape)
    for cut in range(n_layers):
        fired: set[str] = set()

        def detach(t: torch.Tensor, hook: Any, fired: set[str] = fired) -> torch.Tensor:
            fired.add(hook.name)
            return t.detach()

        cuts = [f"blocks.{cut}.hook_attn_out", f"blocks.{cut}.hook_mlp_out"]
        with model.hooks(fwd_hooks=[(n, detach) for n in cuts]):
            base, grad, src = _atp_grad_reference(model, b, lambda l: f"blocks.{l}.attn.hook_z")
        if fired != set(cuts):
            raise AssertionError(f"reference: {set(cuts) - fired} never fired, the cut is not made")
        est = torch.stack([((src[l] - base[l]) * grad[l]).sum(-1) for l in range(n_layers)])  # [layer, b, pos, h]
        if float(est[cut].abs().max()) != 0.0:
            raise AssertionError(f"reference: layer {cut}'s heads still get a gradient with its writes cut")
        total += est.abs().permute(0, 2, 3, 1).float().cpu()
    return res.atp_star.float().cpu(), total / (n_layers - 1)


def cell_patch_by_role(model: Any, b: Batch) -> Pair:
    """Residual stream patched by role slot (each slot's tokens in every prompt at once) against a plain hook
    copying the clean ``hook_resid_pre`` at those positions."""
    from icl_circuits.patching.exact import activation_patch
    from icl_circuits.tasks.roles import role_slots

    eff = activation_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, "resid_pre", per_position=True,
                           answer_positions=b.last, roles=b.roles)  # fmt: skip
    slots = role_slots(b.roles)
    src = _cache(model, b.clean, lambda n: n.endswith("hook_resid_pre"))
    ref = []
    for l in range(model.cfg.n_layers):
        name = f"blocks.{l}.hook_resid_pre"
        row = []
        for s in range(len(slots)):
            m = slots.mask(s).to(src[name].device)[:, :, None]

            def hook(t: torch.Tensor, hook: Any, m: torch.Tensor = m, name: str = name) -> torch.Tensor:
                return torch.where(m, src[name], t)

            row.append(_ld(model, b.corrupted, b, [(name, hook)]))
        ref.append(torch.stack(row))
    return eff.patched_logit_diff.float().cpu(), torch.stack(ref).cpu()


def _cache_with(model: Any, tokens: torch.Tensor, name: str, hooks: list[tuple[str, Any]]) -> torch.Tensor:
    seen: dict[str, torch.Tensor] = {}

    def grab(t: torch.Tensor, hook: Any) -> None:
        seen[name] = t.detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[*hooks, (name, grab)]):
        model(tokens)
    return seen[name]


def cell_path_patching(model: Any, b: Batch) -> Pair:
    """Path patching into the last layer's head 0 query, with frozen MLPs: the formula of run 1 by plain hooks."""
    from icl_circuits.patching.paths import path_patch

    L = model.cfg.n_layers - 1
    eff = path_patch(model, b.clean, b.corrupted, b.answers, b.contrasts, [(L, 0)], "q", answer_positions=b.last,
                     freeze_mlps=True)  # fmt: skip
    zc = _cache(model, b.clean, lambda n: n.endswith("hook_z"))
    zb = _cache(model, b.corrupted, lambda n: n.endswith("hook_z") or n.endswith("hook_mlp_out"))
    ref = torch.zeros(L, model.cfg.n_heads, b.clean.shape[0])
    for l in range(L):
        for h in range(model.cfg.n_heads):
            freeze = [_replace(n, zb[n], (slice(None),)) for n in zb]
            send = f"blocks.{l}.attn.hook_z"
            frozen = [(n, f) for n, f in freeze if n != send]

            def sender(t: torch.Tensor, hook: Any, l: int = l, h: int = h) -> torch.Tensor:
                t = zb[f"blocks.{l}.attn.hook_z"].clone()
                t[:, :, h] = zc[f"blocks.{l}.attn.hook_z"][:, :, h]
                return t

            q = _cache_with(model, b.corrupted, f"blocks.{L}.attn.hook_q", [*frozen, (send, sender)])
            ref[l, h] = _ld(model, b.corrupted, b, [_replace(f"blocks.{L}.attn.hook_q", q,
                                                             (slice(None), slice(None), 0))]).cpu()  # fmt: skip
    return eff.patched_logit_diff.float().cpu(), ref


def cell_function_vectors(model: Any, b: Batch) -> Pair:
    """Todd et al.'s CIE: the answer probability with one head's last-position ``z`` set to its clean mean."""
    from icl_circuits.attribution.function_vectors import function_vector_heads
    from icl_circuits.tasks.pairs import patching_batch
    from icl_circuits.tasks.registry import get_task

    task = get_task("fixture-bound", model)
    fv = function_vector_heads(model, [task], shots=3, n=4, seed=0)
    pb = patching_batch(model, task, 3, 4, 0)
    rows, last = torch.arange(4), pb.last_positions
    zc = _cache(model, pb.clean_tokens, lambda n: n.endswith("hook_z"))

    def p_answer(hooks: list[tuple[str, Any]]) -> torch.Tensor:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            logits = model(pb.corrupted_tokens)
        return logits[rows, last].float().softmax(-1)[rows, pb.answer_tokens]

    base = p_answer([])
    ref = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for l in range(model.cfg.n_layers):
        mean = zc[f"blocks.{l}.attn.hook_z"][rows, last].mean(0)
        for h in range(model.cfg.n_heads):

            def hook(t: torch.Tensor, hook: Any, h: int = h, mean: torch.Tensor = mean) -> torch.Tensor:
                t = t.clone()
                t[rows, last, h] = mean[h]
                return t

            ref[l, h] = (p_answer([(f"blocks.{l}.attn.hook_z", hook)]) - base).mean().cpu()
    return fv.cie[0].float().cpu(), ref


def cell_per_demo(model: Any, b: Batch) -> Pair:
    """Per-demo attribution's head totals against TransformerLens's ``stack_head_results`` + ``logit_attrs``."""
    from icl_circuits.attribution.demos import demo_attribution

    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    da = demo_attribution(model, b.clean, b.answers, b.contrasts, heads, b.roles)
    rows = torch.arange(b.clean.shape[0])
    with torch.no_grad():
        _, cache = model.run_with_cache(b.clean)
    ref = []
    for l, h in heads:  # TransformerLens's own direct logit attribution of one head at the answer position
        res = cache[f"blocks.{l}.attn.hook_z"][rows, b.last, h] @ model.W_O[l, h]
        stack = torch.zeros(1, b.clean.shape[0], b.clean.shape[1], model.cfg.d_model)
        stack[0, rows, b.last] = res
        normed = cache.apply_ln_to_stack(stack, layer=-1)[0, rows, b.last]
        ref.append((normed * (model.W_U[:, b.answers] - model.W_U[:, b.contrasts]).T).sum(-1))
    return da.head_dla.float().cpu(), torch.stack(ref).detach().float().cpu()


def cell_fast_weight_read(model: Any, b: Batch) -> Pair:
    """One prompt's softmax memory read by its own query (before rotation) = the heads' demo part
    ``sum_{s in D} A[q, s] v_s`` of a direct forward (``hook_pattern``, ``hook_v``)."""
    from icl_circuits.fast_weights.transplant import demo_memory, memory_read
    from icl_circuits.models import bos_offset
    from icl_circuits.models.attention import pre_rotary
    from icl_circuits.tasks.roles import roles_from_tokens

    cache = _cache(model, b.clean, lambda n: "attn.hook" in n)
    n_heads, ours, ref = model.cfg.n_heads, [], []
    for p in range(b.clean.shape[0]):
        tok, last = b.clean[p : p + 1], b.last[p : p + 1]
        roles = roles_from_tokens(tok, arrow_id=3, sep_id=4, last_positions=last, prefix_len=bos_offset(model))
        mem = demo_memory(model, tok, roles)
        demo = (b.roles.demo_index[p] >= 0).float()
        for l in range(model.cfg.n_layers):
            ours.append(memory_read(mem, l, pre_rotary(cache, l, "q")[p, last]).reshape(n_heads, -1))
            A = cache[f"blocks.{l}.attn.hook_pattern"][p, :, last[0]].float()  # [head, pos]
            v = (
                cache[f"blocks.{l}.attn.hook_v"][p]
                .float()
                .repeat_interleave(n_heads // cache[f"blocks.{l}.attn.hook_v"].shape[2], 1)
            )
            ref.append(torch.einsum("hs,s,she->he", A, demo, v))
    return torch.stack(ours).cpu(), torch.stack(ref).cpu()


def cell_decomposition(model: Any, b: Batch) -> Pair:
    """The split of each head's output at the query sums to TransformerLens's ``hook_z @ W_O``."""
    from icl_circuits.fast_weights.decompose import decompose

    dec = decompose(model, b.clean, b.roles)
    z = _cache(model, b.clean, lambda n: n.endswith("hook_z"))
    rows = torch.arange(b.clean.shape[0])
    ref = torch.stack([z[f"blocks.{l}.attn.hook_z"][rows, b.last, h] @ model.W_O[l, h] for l, h in dec.heads], 1)
    return dec.per_role.sum(2).float().cpu(), ref.detach().float().cpu()


def cell_transplant(model: Any, b: Batch) -> Pair:
    """The fast-weight transplant ``z += b + W q~``: against a plain hook adding the same from the rotated query."""
    from icl_circuits.fast_weights.transplant import demo_memory, linear_fast_weight, logits_with_fast_weight
    from icl_circuits.models.attention import pre_rotary

    mem = demo_memory(model, b.clean, b.roles)
    W, bias = linear_fast_weight(mem)
    target = b.corrupted[:2]
    last = b.last[:2]
    ours = logits_with_fast_weight(model, target, last, W, bias)
    rows = torch.arange(2)
    hooks: list[tuple[str, Any]] = []
    for l in range(model.cfg.n_layers):  # layer by layer: the query of layer l under the additions below it
        wanted = {f"blocks.{l}.attn.hook_q", f"blocks.{l}.attn.hook_q_normed"}
        cache = _cache_all(model, target, hooks, wanted.__contains__)
        q = pre_rotary(cache, l, "q")[rows, last]
        add = bias[l] + torch.einsum("hef,bhf->bhe", W[l], q)

        def hook(t: torch.Tensor, hook: Any, add: torch.Tensor = add) -> torch.Tensor:
            t = t.clone()
            t[rows, last] += add
            return t

        hooks.append((f"blocks.{l}.attn.hook_z", hook))
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        ref = model(target)[rows, last].float().cpu()
    return ours, ref


CELLS: dict[str, Callable[[Any, Batch], Pair]] = {
    "scoring": cell_scoring,
    "head scores": cell_head_scores,
    "copying": cell_copying,
    "composition": cell_composition,
    "mean ablation": cell_mean_ablation,
    "patch z": _exact("z"),
    "patch q": _exact("q"),
    "patch k": _exact("k"),
    "patch v": _exact("v"),
    "patch z by pos": _exact("z", per_position=True),
    "patch resid": _exact("resid_pre", per_position=True),
    "patch resid by role": cell_patch_by_role,
    "AtP z": cell_atp,
    "AtP* QK fix on q": cell_atp_qk,
    "AtP* QK fix on k": cell_atp_qk_keys,
    "AtP* GradDrop": cell_graddrop,
    "path patching": cell_path_patching,
    "FV heads": cell_function_vectors,
    "per-demo": cell_per_demo,
    "fw decomposition": cell_decomposition,
    "fw memory read": cell_fast_weight_read,
    "transplant": cell_transplant,
}


@dataclass(frozen=True)
class CellResult:
    status: str  # "verified" | "refused" | "MISMATCH" | "ERROR"
    detail: str

    def short(self) -> str:
        return f"{self.status} ({self.detail})" if self.status != "refused" else f"refused: {self.detail}"


def run_cell(name: str, model: Any, b: Batch) -> CellResult:
    try:
        ours, ref = CELLS[name](model, b)
    except ICLCircuitsError as e:
        return CellResult("refused", str(e))
    except Exception as e:  # noqa: BLE001 - a raw exception is a failed cell, reported with its traceback
        return CellResult("ERROR", f"{type(e).__name__}: {e} | {traceback.format_exc(limit=-3)}")
    if ours.shape != ref.shape:
        return CellResult("MISMATCH", f"shape {tuple(ours.shape)} vs reference {tuple(ref.shape)}")
    gap = float((ours.float() - ref.float()).abs().max())
    tol = TOL * (1.0 + float(ref.abs().max()))
    return CellResult("verified" if gap <= tol else "MISMATCH", f"max diff {gap:.1e}")
