"""The shrink coefficient beta (icl_circuits.tasks.scoring.shrink_coefficient) against closed-form values."""

from __future__ import annotations

import math

import pytest
import torch

from icl_circuits import InputError
from icl_circuits.tasks.scoring import shrink_coefficient


def _log_softmax(row: list[float]) -> list[float]:
    s = math.log(sum(math.exp(x) for x in row))
    return [x - s for x in row]


def _beta(noisy: list[list[float]], clean: list[list[float]], zero: list[list[float]]) -> float:
    """sum_b <u_b, u0_b> / sum_b |u0_b|^2 in plain Python, with u = log q - log q_zero per row."""
    num = den = 0.0
    for x, c, z in zip(noisy, clean, zero):
        lx, lc, lz = _log_softmax(x), _log_softmax(c), _log_softmax(z)
        u, u0 = [a - b for a, b in zip(lx, lz)], [a - b for a, b in zip(lc, lz)]
        num += sum(a * b for a, b in zip(u, u0))
        den += sum(b * b for b in u0)
    return num / den


def test_two_labels_closed_form():
    """Two labels, zero-shot logits equal (q = 1/2), clean logit gap a, noisy gap b: with s(x) = log(1 + e^x),
    u0 = (a - s(a) + log 2, log 2 - s(a)) and u = (b - s(b) + log 2, log 2 - s(b))."""
    a, b = 2.0, 0.5

    def s(x: float) -> float:
        return math.log1p(math.exp(x))

    u0 = (a - s(a) + math.log(2), math.log(2) - s(a))
    u = (b - s(b) + math.log(2), math.log(2) - s(b))
    want = (u[0] * u0[0] + u[1] * u0[1]) / (u0[0] ** 2 + u0[1] ** 2)
    # a third vocabulary entry, far larger: it changes the full-vocabulary beta, not the label-renormalised one
    t = lambda x: torch.tensor([[x, 0.0, 5.0]])  # noqa: E731
    labels = torch.tensor([0, 1])
    got = shrink_coefficient(t(b), t(a), t(0.0), labels)
    assert got == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx(0.2217, abs=1e-4)  # the numbers above, by hand: 0.5268 / 2.3763
    full = shrink_coefficient(t(b), t(a), t(0.0))
    assert full == pytest.approx(_beta([[b, 0, 5]], [[a, 0, 5]], [[0, 0, 5]]), rel=1e-6)
    assert abs(full - got) > 0.01  # the normalisation is what differs


def test_batch_is_pooled_and_shift_invariant():
    g = torch.Generator().manual_seed(0)
    zero, clean, noisy = (torch.randn(4, 6, generator=g) for _ in range(3))
    want = _beta(noisy.tolist(), clean.tolist(), zero.tolist())
    assert shrink_coefficient(noisy, clean, zero) == pytest.approx(want, rel=1e-5)
    shift = torch.randn(4, 1, generator=g)  # a per-row constant (compatibility mode's centred unembedding)
    assert shrink_coefficient(noisy + shift, clean - shift, zero) == pytest.approx(want, rel=1e-5)
    labels = torch.tensor([1, 3, 4])
    sub = [[[row[i] for i in (1, 3, 4)] for row in m.tolist()] for m in (noisy, clean, zero)]
    assert shrink_coefficient(noisy, clean, zero, labels) == pytest.approx(_beta(*sub), rel=1e-5)
    with pytest.raises(InputError, match=r"\[batch, d_vocab\]"):
        shrink_coefficient(noisy[:2], clean, zero)
