"""The query and key vectors whose dot product gives a head's attention scores, on every architecture.

``scores[t, s] = q~_t . k~_s / scale``. Without rotary embeddings ``q~ = hook_q``. With RoPE (Su et al. 2021)
``q~_t = R(t) q_t`` where ``q_t`` is the query entering the rotation (``hook_q``, or ``hook_q_normed`` on models
with QK-norm) and ``R(t)`` rotates pairs ``(x_i, x_{i + r/2})`` of the first ``r`` (``rotary_dim``) dimensions by
the angles whose cosines and sines the bridge exposes as ``hook_cos`` / ``hook_sin [batch, pos, r]`` (the
Hugging Face "rotate-half" form; the remaining ``d_head - r`` dimensions pass through, as in GPT-NeoX's partial
rotary)::

    R(t) x = x * cos_t + rotate_half(x) * sin_t,    rotate_half([x1, x2]) = [-x2, x1]

so ``q~_t . k~_s = q_t^T R(s - t) k_s`` depends on the relative position only. TransformerLens 4.3 registers
``hook_rot_q`` / ``hook_rot_k`` on every rotary bridge, but on GPT-NeoX they never fire: :func:`score_vectors`
uses them where they fired and otherwise applies :func:`rotate` itself; callers check the result against
``hook_attn_scores``.
"""

from __future__ import annotations

from typing import Any

import torch

from icl_circuits.errors import InputError

ROTARY_INPUTS = ("hook_q", "hook_k", "hook_q_normed", "hook_k_normed", "hook_cos", "hook_sin", "hook_rot_q",
                 "hook_rot_k")  # fmt: skip


def is_rotary(model: Any) -> bool:
    return getattr(model.cfg, "positional_embedding_type", None) == "rotary"


def hook_names(layer: int) -> list[str]:
    """Every hook :func:`score_vectors` may read in ``layer`` (cache these; the ones a model lacks are skipped)."""
    return [f"blocks.{layer}.attn.{n}" for n in ROTARY_INPUTS]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``R x`` for ``x [batch, pos, head, d]`` and ``cos``/``sin [batch, pos, r]`` (``r <= d``, even); see module doc.

    Also ``x [n, head, d]`` with ``cos``/``sin [n, r]`` (one position per row)."""
    r = cos.shape[-1]
    if r > x.shape[-1] or r % 2:
        raise InputError(f"rotary tables of width {r} do not fit vectors of size {x.shape[-1]}")
    c, s = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    xr, rest = x[..., :r], x[..., r:]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2 :]
    return torch.cat([xr * c + torch.cat([-x2, x1], -1) * s, rest], -1)


def rotation_matrix(cos: torch.Tensor, sin: torch.Tensor, d: int) -> torch.Tensor:
    """``R [n, d, d]`` with ``R[i] x = rotate(x, cos[i], sin[i])`` for ``cos``/``sin [n, r]``."""
    eye = torch.eye(d, dtype=cos.dtype, device=cos.device).expand(cos.shape[0], 1, d, d)[:, 0]  # [n, d(basis), d]
    return rotate(eye, cos, sin).mT  # column j = R e_j


def pre_rotary(acts: dict[str, Any], layer: int, kind: str) -> torch.Tensor:
    """``[batch, pos, head, d]``: the query (``kind="q"``) or key entering the rotation (after QK-norm if any)."""
    a = f"blocks.{layer}.attn."
    normed = _get(acts, a + f"hook_{kind}_normed")
    if normed is not None:
        return normed.transpose(1, 2)  # the bridge's QK-norm hooks are [batch, head, pos, d]
    plain = _get(acts, a + f"hook_{kind}")
    if plain is None:
        raise InputError(f"{a}hook_{kind} did not fire on this model")
    return plain


def rotary_tables(acts: dict[str, Any], layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(cos, sin) [batch, pos, r]`` of ``layer`` (``None`` when the model has no rotary embedding)."""
    a = f"blocks.{layer}.attn."
    cos, sin = _get(acts, a + "hook_cos"), _get(acts, a + "hook_sin")
    return None if cos is None or sin is None else (cos, sin)


def score_vectors(model: Any, acts: dict[str, Any], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q~ [batch, pos, n_heads, d], k~ [batch, pos, n_kv_heads, d])`` as they enter the scores of ``layer``.

    ``acts`` holds the cached hooks of :func:`hook_names` (a dict or an ``ActivationCache``).

    Raises:
        InputError: a rotary model whose cosine/sine tables did not fire.
    """
    a = f"blocks.{layer}.attn."
    if not is_rotary(model):
        return pre_rotary(acts, layer, "q"), pre_rotary(acts, layer, "k")
    rq, rk = _get(acts, a + "hook_rot_q"), _get(acts, a + "hook_rot_k")
    if rq is not None and rk is not None:
        return rq, rk
    tables = rotary_tables(acts, layer)
    if tables is None:
        raise InputError(f"layer {layer}: a rotary model, but neither {a}hook_rot_q/k nor {a}hook_cos/sin fired")
    cos, sin = tables
    return rotate(pre_rotary(acts, layer, "q"), cos, sin), rotate(pre_rotary(acts, layer, "k"), cos, sin)


def _get(acts: Any, name: str) -> torch.Tensor | None:
    """``acts[name]`` or ``None`` (for dicts and TransformerLens's ``ActivationCache`` alike)."""
    return acts[name] if name in acts.keys() else None
