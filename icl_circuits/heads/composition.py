"""Weight-based head scores: OV copying and Q/K/V composition (Elhage et al. 2021, "A Mathematical Framework").

Row-vector convention, as TransformerLens: a head reads ``x @ W_V`` and writes ``z @ W_O``, so its OV
circuit is ``W_OV = W_V W_O`` ``[d_model, d_model]`` and its QK circuit ``W_QK = W_Q W_K^T``. Weights are
the bridge's processed ones (compatibility mode: LayerNorm weights folded into ``W_Q/W_K/W_V``, unembed
centred); the normalisation itself, biases and rotary position rotations are not part of these
circuits. Grouped-query models repeat each K/V head to the query heads that share it
(``repeat_interleave``), as TransformerLens does.

Copying score of head ``(l, h)`` on a token set ``S`` (default: every ordinary token): the full OV
circuit ``C = W_E[S] W_V W_O W_U[:, S]`` ``[|S|, |S|]`` (row ``i``: attending to token ``S_i``; column
``j``: effect on the logit of ``S_j``) is summarised by Elhage et al.'s eigenvalue statistic
``copying = sum_i Re(lambda_i) / sum_i |lambda_i|`` in ``[-1, 1]``: ``+1`` when every eigenvalue is
positive (the head raises the logit of the token it attends to), ``-1`` for anti-copying, about
``0`` for a random matrix. (For a real spectrum this is ``2 * positive share - 1``, the positive
eigenvalue share rescaled to ``[-1, 1]``.) ``C`` is never formed: its non-zero eigenvalues are those
of ``W_O (W_U[:, S] W_E[S]) W_V`` ``[d_head, d_head]`` (``eig(AB) = eig(BA)``), so the cost is one
``|S| x d_model^2`` product plus ``n_heads`` tiny eigenproblems -- exact for the whole 50k vocabulary
of GPT-2 in about a second; ``n_tokens`` samples ``S`` for larger vocabularies.

Composition score of sender head ``A`` (earlier layer) into receiver ``B``:
``||W_A W_B||_F / (||W_A||_F ||W_B||_F)`` with ``(W_A, W_B) = (W_OV^A, W_QK^B)`` for Q-composition,
``(W_OV^A, (W_QK^B)^T)`` for K-composition (``A`` writes what ``B``'s keys read) and
``(W_OV^A, W_OV^B)`` for V-composition. TransformerBridge's ``all_composition_scores`` computes exactly these,
but broadcasts all pairs at once (8 GB for GPT-2 small); :func:`all_composition_scores` gets the same numbers
from packed ``d_model x d_model`` Gram matrices of QR-reduced factors, ``d_model^2 / 2`` multiply-adds per
pair (checked against TransformerLens and dense products in tests).
Because random matrices compose a little, Elhage et al. compare with the score of random matrices of
the same shapes: :func:`composition_baseline` samples Gaussian factors with the model's shapes and
returns the mean and standard deviation; ``z = (score - mean) / std`` says how far a pair stands out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from icl_circuits.errors import InputError
from icl_circuits.heads.scores import ordinary_token_ids
from icl_circuits.shapes import expand_kv

MODES = ("Q", "K", "V")


def eigenvalue_positivity(matrices: torch.Tensor) -> torch.Tensor:
    """``[..., d, d]`` -> ``[...]``: ``sum Re(lambda) / sum |lambda|`` of each matrix (0 for the zero matrix)."""
    eig = torch.linalg.eigvals(matrices.double())
    den = eig.abs().sum(-1)
    return torch.where(den > 0, eig.real.sum(-1) / den.clamp_min(1e-300), torch.zeros_like(den)).float()


@torch.no_grad()
def copying_scores(
    model: Any, *, n_tokens: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``[layer, head]`` copying scores of the full OV circuits on the ordinary tokens (or ``n_tokens`` of them).

    ``n_tokens`` draws that many ordinary tokens with ``generator`` (required then); ``None`` uses all.
    """
    pool = ordinary_token_ids(model)
    if n_tokens is not None:
        if n_tokens < 2:
            raise InputError(f"n_tokens must be >= 2, got {n_tokens}")
        if generator is None:
            raise InputError("n_tokens samples tokens: pass generator=torch.Generator().manual_seed(seed)")
        if n_tokens < len(pool):
            pool = pool[torch.randperm(len(pool), generator=generator)[:n_tokens]]
    W_E = model.W_E.detach().float()  # [vocab, d_model]
    W_U = model.W_U.detach().float()  # [d_model, vocab]
    idx = pool.to(W_E.device)
    G = W_U[:, idx] @ W_E[idx]  # [d_model, d_model]; float32: |S| d_model^2, the one large product
    W_V = expand_kv(model.W_V.detach().float(), int(model.cfg.n_heads), dim=1)  # [layer, head, d_model, d_head]
    W_O = model.W_O.detach().float()  # [layer, head, d_head, d_model]
    small = W_O @ G @ W_V  # [layer, head, d_head, d_head]: same non-zero spectrum as C
    return eigenvalue_positivity(small).cpu()  # eigenvalues in float64


def _triangle(a: torch.Tensor) -> torch.Tensor:
    """``T [..., d_head, d_head]`` with ``a = Q T`` (``a [..., d_model, d_head]``, ``Q`` orthonormal columns; QR)."""
    return torch.linalg.qr(a, mode="r")[1]


def _reduced_sender(V: torch.Tensor, O: torch.Tensor) -> torch.Tensor:
    """Sender OV ``V O`` (``V [n, d_model, d_head]``, ``O [n, d_head, d_model]``) as ``T_V O [n, d_head, d_model]``.

    With ``V = Q_V T_V`` and a receiver ``P R^T``, ``R = Q_R T_R`` (QR), ``V O P R^T = Q_V (T_V O)(P T_R^T) Q_R^T``
    and orthonormal ``Q`` keep Frobenius norms: ``||V O P R^T||_F = ||(T_V O)(P T_R^T)||_F``,
    ``||V O||_F = ||T_V O||_F``, ``||P R^T||_F = ||P T_R^T||_F``.
    """
    return _triangle(V) @ O


def _reduced_receiver(P: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Receiver ``P R^T`` (``P, R [n, d_model, d_head]``) as ``P T_R^T [n, d_model, d_head]`` (see
    :func:`_reduced_sender`)."""
    return P @ _triangle(R).transpose(-2, -1)


def _receiver_factors(W: dict[str, torch.Tensor], mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(P, R)`` with the receiver's matrix ``= P R^T``: W_QK for Q, W_QK^T for K, W_OV for V."""
    if mode == "Q":
        return W["Q"], W["K"]
    if mode == "K":
        return W["K"], W["Q"]
    return W["V"], W["O"].transpose(-2, -1)


def _packed_gram(a: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """``a [n, k, D]`` -> ``[n, D (D + 1) / 2]``: the upper triangle of each ``a^T a`` (float64), off-diagonal
    entries times ``sqrt 2``, so that ``packed(a) . packed(b) = <a^T a, b^T b>_F = ||a b^T||_F^2``."""
    D = int(a.shape[-1])
    iu = torch.triu_indices(D, D, device=a.device)
    flat = iu[0] * D + iu[1]
    weight = torch.where(iu[0] == iu[1], 1.0, 2.0**0.5).to(a.device, torch.float64)
    out = []
    for lo in range(0, a.shape[0], chunk):  # [chunk, D, D] at a time
        g = a[lo : lo + chunk].double()
        out.append((g.transpose(-2, -1) @ g).reshape(-1, D * D).index_select(1, flat) * weight)
    return torch.cat(out)


def _weights(model: Any) -> dict[str, torch.Tensor]:
    n = int(model.cfg.n_heads)
    return {
        "Q": model.W_Q.detach().double(),
        "K": expand_kv(model.W_K.detach().double(), n, dim=1),
        "V": expand_kv(model.W_V.detach().double(), n, dim=1),
        "O": model.W_O.detach().double(),
    }


@torch.no_grad()
def composition_scores(model: Any, mode: str) -> torch.Tensor:
    """``[layer_A, head_A, layer_B, head_B]``: ``mode`` composition of sender A into receiver B.

    Zero unless A's layer is below B's. Equal to ``TransformerBridge.all_composition_scores(mode)``
    (tests/heads/test_composition.py checks it); :func:`all_composition_scores` for how it is computed.
    """
    return all_composition_scores(model, (mode,))[mode]


@torch.no_grad()
def all_composition_scores(model: Any, modes: tuple[str, ...] = MODES) -> dict[str, torch.Tensor]:
    """``{mode: [layer_A, head_A, layer_B, head_B]}`` for each of ``modes`` (see :func:`composition_scores`).

    ``||W_A W_B||_F^2 = <W_A^T W_A, W_B W_B^T>_F``: each head's ``d_model x d_model`` Gram matrix is
    formed once (from the QR-reduced factors of :func:`_reduced_sender`; the senders' is shared by the modes)
    and packed, and all pairs come from one float64 product of the packed Grams, ``d_model^2 / 2``
    multiply-adds per pair. TransformerLens broadcasts every pair to ``[L, H, L, H, d_head, d_model]``
    (8 GB and ~50 s per mode for GPT-2 small on 2 cores); the products themselves would cost
    ``d_head^2 d_model`` per pair (9x more at SmolLM2's shapes). Memory: two ``[L H, d_model^2 / 2]``
    float64 tables (~350 MB each for SmolLM2).
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise InputError(f"composition mode must be one of {MODES}, got {bad[0]!r}")
    W = _weights(model)
    L, H = W["Q"].shape[:2]
    V, O = W["V"][:-1].flatten(0, 1), W["O"][:-1].flatten(0, 1)  # senders: layers 0..L-2
    left = _reduced_sender(V, O)  # [s, d_head, d_model]
    senders = _packed_gram(left)
    norm_a = left.square().sum((-2, -1)).sqrt().reshape(L - 1, H)
    below = layer_mask(L, H)[:-1, :, 1:].to(senders.device)  # sender layer < receiver layer
    out = {}
    for mode in modes:
        P, R = (f[1:].flatten(0, 1) for f in _receiver_factors(W, mode))  # receivers: layers 1..L-1
        right = _reduced_receiver(P, R)  # [r, d_model, d_head]
        sq = (senders @ _packed_gram(right.transpose(-2, -1)).T).clamp_min(0).reshape(L - 1, H, L - 1, H)
        norm_b = right.square().sum((-2, -1)).sqrt().reshape(L - 1, H)
        score = sq.sqrt() / norm_a[:, :, None, None] / norm_b[None, None]
        full = torch.zeros(L, H, L, H, dtype=torch.float64, device=score.device)
        full[:-1, :, 1:] = torch.where(below, score, torch.zeros_like(score))
        out[mode] = full.float().cpu()
    return out


@dataclass(frozen=True)
class Baseline:
    """Composition score of random matrices with the model's shapes: mean and std over ``n`` draws."""

    mean: float
    std: float
    n: int


@torch.no_grad()
def composition_baseline(
    d_model: int, d_head: int, mode: str, *, n: int = 200, generator: torch.Generator
) -> Baseline:
    """Scores of ``n`` pairs of random heads.

    Random heads have i.i.d. Gaussian ``W_Q, W_K, W_V [d_model, d_head]`` and ``W_O [d_head, d_model]``;
    the score is scale-free, so the Gaussian's variance does not matter, only the shapes do.
    Draw order: sender ``W_V``, ``W_O``, then the receiver's two factors (``W_Q, W_K`` or ``W_V, W_O``).
    """
    if mode not in MODES:
        raise InputError(f"composition mode must be one of {MODES}, got {mode!r}")
    if n < 2:
        raise InputError(f"need n >= 2 random draws for a standard deviation, got {n}")

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(n, *shape, generator=generator, dtype=torch.float64)  # cpu: no model tensor involved

    V, O = randn(d_model, d_head), randn(d_head, d_model)
    first, second = randn(d_model, d_head), (randn(d_head, d_model) if mode == "V" else randn(d_model, d_head))
    W = {"Q": first, "K": second, "V": first, "O": second}
    left, right = _reduced_sender(V, O), _reduced_receiver(*_receiver_factors(W, mode))  # draw i with draw i
    s = torch.linalg.matrix_norm(left @ right) / torch.linalg.matrix_norm(left) / torch.linalg.matrix_norm(right)
    return Baseline(mean=float(s.mean()), std=float(s.std()), n=n)


def layer_mask(n_layers: int, n_heads: int) -> torch.Tensor:
    """``[L, H, L, H]`` bool: True where the sender's layer is below the receiver's (the pairs that can compose)."""
    lay = torch.arange(n_layers)
    m = lay[:, None] < lay[None, :]
    return m[:, None, :, None].expand(n_layers, n_heads, n_layers, n_heads)
