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


def all_heads(n_layers: int, n_heads: int) -> list[Head]:
    """Every ``(layer, head)``, layer-major."""
    return [(l, h) for l in range(n_layers) for h in range(n_heads)]


def check_heads(
    heads: Iterable[Sequence[int]], n_layers: int, n_heads: int, *, what: str = "heads", unit: str = "heads"
) -> list[Head]:
    """``heads`` as validated, de-duplicated ``(layer, head)`` int pairs (order kept).

    Raises:
        InputError: a pair that is not two integers, or lies outside ``n_layers x n_heads`` (all named).
    """
    out: list[Head] = []
    for x in heads:
        if len(x) != 2:
            raise InputError(f"{what}: each entry must be a (layer, head) pair, got {x!r}")
        out.append((int(x[0]), int(x[1])))
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
