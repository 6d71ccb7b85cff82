"""In-context linear regression with linear self-attention, compared with one step of gradient descent.

von Oswald et al. 2023 ("Transformers learn in-context by gradient descent"): a linear
self-attention (LSA) layer trained on in-context regression implements one step of gradient descent
on the demos. This module holds the model of the ``regression-tiny`` fixture (trained by
``fixtures/train_regression.py``), its exact fast-weight readout and the comparison.

**Data.** Per sequence ``w ~ N(0, I_d)``; demos ``x_i ~ N(0, I_d)``, ``y_i = w . x_i`` (``i = 1..N``);
query ``x_q`` with target ``w . x_q``. Tokens ``e_i = [x_i; y_i]`` and ``e_q = [x_q; 0]`` in ``R^{d+1}``.

**Model** (no softmax, no LayerNorm, no MLP; keys and values are the demo tokens only)::

    dW_h   = (1/N) sum_i (W_V,h e_i)(W_K,h e_i)^T              # [d+1, d+1]: the fast weight of head h
    out_q  = e_q + sum_h dW_h W_Q,h e_q
    y_hat  = out_q[d]                                           # the last coordinate

so ``y_hat = w_model . x_q`` exactly, with the **extracted update** ``w_model = sum_h (dW_h W_Q,h)[d, :d]``
(the query's ``y`` slot is 0). With no demos ``y_hat = 0``: the prediction change equals ``y_hat``.

**One step of GD** on ``L(w) = 1/(2N) sum_i (w . x_i - y_i)^2`` from ``w_0 = 0`` with step ``eta``:
``w_GD = (eta/N) sum_i y_i x_i``. Reported by number of demos ``N``:

* ``prediction_cosine``: cosine between the model's predictions ``[y_hat_b]`` and the GD predictions
  ``[w_GD,b . x_q,b]`` over the batch (scale-free, so ``eta`` does not matter);
* ``update_cosine``: mean over sequences of ``cos(w_model, w_GD)``; also against the least-squares
  solution (``pinv``; min-norm for ``N < d``) and the true ``w``;
* ``best_eta``: the least-squares step ``eta`` matching the model's predictions, and the model's MSE.

Sign convention: cosines are signed (a model computing ``-GD`` scores -1). Cost: one batched forward
and ``O(batch * N * (d+1)^2)`` per ``N``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from icl_circuits.errors import InputError, ModelSpecError
from icl_circuits.results import Result


@dataclass(frozen=True)
class LSAConfig:
    """Shape of a linear self-attention regressor: input dimension ``d`` and number of heads."""

    d: int = 5
    n_heads: int = 1
    init_std: float = 0.2

    def __post_init__(self) -> None:
        if self.d < 1 or self.n_heads < 1:
            raise InputError(f"need d >= 1 and n_heads >= 1, got {self}")


class LinearSelfAttention(torch.nn.Module):
    """One layer of linear self-attention over ``[x; y]`` tokens (module doc); parameters ``W_Q/W_K/W_V
    [head, d+1, d+1]``, initialised from ``generator``."""

    def __init__(self, cfg: LSAConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        n = cfg.d + 1
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.W_Q = torch.nn.Parameter(torch.randn(cfg.n_heads, n, n, generator=g) * cfg.init_std)  # cpu: params
        self.W_K = torch.nn.Parameter(torch.randn(cfg.n_heads, n, n, generator=g) * cfg.init_std)  # cpu: params
        self.W_V = torch.nn.Parameter(torch.randn(cfg.n_heads, n, n, generator=g) * cfg.init_std)  # cpu: params

    def fast_weights(self, demos: torch.Tensor) -> torch.Tensor:
        """``demos [batch, N, d+1]`` -> ``dW [batch, head, d+1, d+1] = (1/N) sum_i (W_V e_i)(W_K e_i)^T``."""
        v = torch.einsum("hac,bnc->bnha", self.W_V, demos)
        k = torch.einsum("hac,bnc->bnha", self.W_K, demos)
        return torch.einsum("bnha,bnhc->bhac", v, k) / demos.shape[1]

    def update(self, demos: torch.Tensor) -> torch.Tensor:
        """The extracted update ``w_model [batch, d]``: ``sum_h (dW_h W_Q,h)[d, :d]``."""
        d = self.cfg.d
        return torch.einsum("bhac,hce->be", self.fast_weights(demos)[:, :, d : d + 1], self.W_Q[:, :, :d])

    def forward(self, demos: torch.Tensor, x_query: torch.Tensor) -> torch.Tensor:
        """``demos [batch, N, d+1]``, ``x_query [batch, d]`` -> ``y_hat [batch]`` (the full forward)."""
        _check(demos, x_query, self.cfg.d)
        e_q = torch.cat([x_query, torch.zeros_like(x_query[:, :1])], dim=-1)  # [batch, d+1]
        q = torch.einsum("hac,bc->bha", self.W_Q, e_q)
        out = e_q + torch.einsum("bhac,bhc->ba", self.fast_weights(demos), q)
        return out[:, self.cfg.d]


def _check(demos: torch.Tensor, x_query: torch.Tensor, d: int) -> None:
    if demos.ndim != 3 or demos.shape[-1] != d + 1 or demos.shape[1] < 1:
        raise InputError(f"demos must be [batch, N >= 1, {d + 1}], got {tuple(demos.shape)}")
    if x_query.shape != (demos.shape[0], d):
        raise InputError(f"x_query must be [{demos.shape[0]}, {d}], got {tuple(x_query.shape)}")


def sample_regression(
    generator: torch.Generator, batch: int, n_demos: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(demos [batch, N, d+1], x_query [batch, d], y_query [batch], w [batch, d])`` (module doc)."""
    if batch < 1 or n_demos < 1 or d < 1:
        raise InputError(f"need batch, n_demos, d >= 1, got {batch}, {n_demos}, {d}")
    w = torch.randn(batch, d, generator=generator)  # cpu: the generator's device; callers move the data
    x = torch.randn(batch, n_demos + 1, d, generator=generator)  # cpu: as w
    y = torch.einsum("bnd,bd->bn", x, w)
    demos = torch.cat([x[:, :-1], y[:, :-1, None]], dim=-1)
    return demos, x[:, -1], y[:, -1], w


def gd_update(demos: torch.Tensor) -> torch.Tensor:
    """One GD step from 0 with ``eta = 1``: ``(1/N) sum_i y_i x_i`` -> ``[batch, d]``."""
    return torch.einsum("bn,bnd->bd", demos[..., -1], demos[..., :-1]) / demos.shape[1]


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1, eps=1e-30)


@dataclass(frozen=True)
class GDComparison(Result):
    """The model's predictions and extracted updates against one GD step, by number of demos."""

    rows: tuple[dict[str, Any], ...]
    d: int
    n_heads: int
    batch: int
    seed: int

    title = "In-context regression vs one GD step"

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        import pandas as pd

        return pd.DataFrame(list(self.rows))

    def to_dict(self) -> dict[str, Any]:
        return {"d": self.d, "n_heads": self.n_heads, "batch": self.batch, "seed": self.seed,
                "rows": [dict(r) for r in self.rows]}  # fmt: skip

    def min_prediction_cosine(self) -> float:
        return min(float(r["prediction_cosine"]) for r in self.rows)

    def plot(self) -> Any:  # plotly Figure
        """Cosines against the number of demos. Pure: returns the figure."""
        import plotly.graph_objects as go

        n = [r["n_demos"] for r in self.rows]
        fig = go.Figure()
        for key, name in (
            ("prediction_cosine", "predictions vs 1-step GD"),
            ("update_cosine", "w_model vs w_GD"),
            ("update_cosine_ols", "w_model vs least squares"),
            ("update_cosine_true", "w_model vs w"),
        ):
            fig.add_trace(go.Scatter(x=n, y=[r[key] for r in self.rows], mode="lines+markers", name=name))  # fmt: skip
        fig.update_layout(title=f"Linear self-attention vs one step of gradient descent (d={self.d})",
                          xaxis_title="number of demos N", yaxis_title="cosine", yaxis_range=[-0.05, 1.05])  # fmt: skip
        return fig

    def _repr_html_(self) -> str:
        return "<b>In-context regression vs one GD step</b>" + self.to_dataframe().to_html(
            index=False, float_format="%.3f"
        )


@torch.no_grad()
def compare_with_gd(
    model: LinearSelfAttention, n_demos: Sequence[int] = (1, 2, 3, 5, 10, 20), *, batch: int = 2048, seed: int = 0
) -> GDComparison:
    """Predictions and extracted updates of ``model`` against one GD step (module doc), per ``N``."""
    d = model.cfg.d
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in n_demos:
        demos, xq, yq, w = sample_regression(gen, batch, int(n), d)
        y_hat = model(demos, xq)
        w_model = model.update(demos)
        w_gd = gd_update(demos)
        y_gd = (w_gd * xq).sum(-1)
        w_ols = torch.linalg.pinv(demos[..., :-1].double()) @ demos[..., -1:].double()
        eta = float((y_hat * y_gd).sum() / y_gd.pow(2).sum())
        rows.append({
            "n_demos": int(n),
            "prediction_cosine": float(_cos(y_hat, y_gd)),
            "update_cosine": float(_cos(w_model, w_gd).mean()),
            "update_cosine_ols": float(_cos(w_model, w_ols[..., 0]).mean()),
            "update_cosine_true": float(_cos(w_model, w).mean()),
            "gd_cosine_true": float(_cos(w_gd, w).mean()),
            "best_eta": eta,
            "model_mse": float((y_hat - yq).pow(2).mean()),
            "gd_mse_at_best_eta": float((eta * y_gd - yq).pow(2).mean()),
            "readout_gap": float((y_hat - (w_model * xq).sum(-1)).abs().max()),
        })  # fmt: skip
    return GDComparison(tuple(rows), d, model.cfg.n_heads, batch, seed)


FIXTURE_NAME = "regression-tiny"
CONFIG_FILE = "lsa_config.json"  # not config.json: this is not a Hugging Face model folder


def save_lsa(model: LinearSelfAttention, folder: str | os.PathLike[str], record: dict[str, Any]) -> Path:
    """Write ``model.safetensors``, ``lsa_config.json`` and ``record.json`` into ``folder``."""
    from safetensors.torch import save_file

    from icl_circuits.io import atomic_write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    atomic_write_json(folder / CONFIG_FILE, asdict(model.cfg))
    atomic_write_json(folder / "record.json", record)
    return folder


def load_lsa(folder: str | os.PathLike[str] | None = None) -> LinearSelfAttention:
    """Load a saved regressor (default: the ``regression-tiny`` fixture).

    Raises:
        ModelSpecError: the folder lacks ``lsa_config.json`` or ``model.safetensors``.
    """
    from safetensors.torch import load_file

    from icl_circuits.models import fixtures_dir

    folder = Path(folder) if folder is not None else fixtures_dir() / FIXTURE_NAME
    cfg_path, weights = folder / CONFIG_FILE, folder / "model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ModelSpecError(f"{str(folder)!r} has no {CONFIG_FILE} + model.safetensors; run "
                             "`python -m fixtures.train_regression`")  # fmt: skip
    model = LinearSelfAttention(LSAConfig(**json.loads(cfg_path.read_text())))
    model.load_state_dict(load_file(str(weights)))
    return model.eval()
