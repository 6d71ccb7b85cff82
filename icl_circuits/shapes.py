"""Model-shape helpers every subpackage shares: the ``Head`` key, head-range checks, grouped-query expansion.

A head is ``(layer, head)`` with ``0 <= layer < n_layers`` and ``0 <= head < n_heads`` (query heads).
Grouped-query attention (Ainslie et al. 2023) gives a model ``n_kv = n_key_value_heads`` key/value
heads, each shared by ``n_heads / n_kv`` consecutive query heads: query head ``h`` reads key/value
head ``h // (n_heads / n_kv)``, which :func:`expand_kv` applies (``repeat_interleave``, as
TransformerLens and Hugging Face do).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from icl_circuits.errors import InputError

Head = tuple[int, int]


def model_shape(model: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of a TransformerBridge (its ``cfg``)."""
    return int(model.cfg.n_layers), int(model.cfg.n_heads)


def all_heads(model: Any) -> list[Head]:
    """Every ``(layer, head)`` of the model, layer-major."""
    n_layers, n_heads = model_shape(model)
    return [(l, h) for l in range(n_layers) for h in range(n_heads)]


def check_heads(
    heads: Iterable[Sequence[int]],
    n_layers: int,
    n_heads: int,
    *,
    what: str = "heads",
    unit: str = "heads",
    allow_empty: bool = True,
) -> list[Head]:
    """``heads`` as validated, de-duplicated ``(layer, head)`` int pairs (order kept).

    ``what`` names the argument in messages; ``unit`` the second axis (``"key/value heads"``...).

    Raises:
        InputError: an entry that is not a pair of integers, a pair outside ``n_layers x n_heads``
            (all of them named), or no pair at all when ``allow_empty`` is False.
    """
    try:
        out = [(int(l), int(h)) for l, h in heads]
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} must be a sequence of (layer, head) pairs, got {heads!r}") from e
    if not out and not allow_empty:
        raise InputError(f"{what} is empty: give at least one (layer, head)")
    bad = [x for x in out if not (0 <= x[0] < n_layers and 0 <= x[1] < n_heads)]
    if bad:
        raise InputError(f"{what} {bad} outside the model ({n_layers} layers x {n_heads} {unit})")
    return list(dict.fromkeys(out))


def check_model_heads(model: Any, heads: Iterable[Sequence[int]], *, what: str = "heads") -> list[Head]:
    """:func:`check_heads` against the model's own ``n_layers x n_heads``."""
    return check_heads(heads, *model_shape(model), what=what)


def n_kv_heads(model: Any) -> int:
    """The number of key/value heads (``n_key_value_heads``; ``n_heads`` without grouped-query attention)."""
    return int(getattr(model.cfg, "n_key_value_heads", None) or model.cfg.n_heads)


def expand_kv(t: torch.Tensor, n_heads: int, dim: int) -> torch.Tensor:
    """``t`` with its key/value-head axis ``dim`` (``n_kv`` long) expanded to ``n_heads`` query heads.

    Each key/value head is repeated ``n_heads / n_kv`` times in place (``repeat_interleave``); no-op
    (the same tensor) when ``n_kv == n_heads``.

    Raises:
        InputError: ``n_kv`` does not divide ``n_heads``.
    """
    n_kv = int(t.shape[dim])
    if n_kv == n_heads:
        return t
    if n_kv < 1 or n_heads % n_kv:
        raise InputError(f"{n_kv} key/value heads do not divide {n_heads} query heads")
    return t.repeat_interleave(n_heads // n_kv, dim=dim)
