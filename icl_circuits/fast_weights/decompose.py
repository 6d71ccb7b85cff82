"""Fast weights: the demonstrations' contribution to an attention head, split exactly and read as a matrix.

Schlag et al. 2021 ("Linear transformers are secretly fast weight programmers"), Dai et al. 2023
("Why can GPT learn in-context? ... meta-optimizers"), von Oswald et al. 2023 ("Transformers learn
in-context by gradient descent"): attention turns ``key -> value`` demonstrations into a temporary
low-rank weight applied to the query, on top of the frozen weights.

**Exact decomposition.** For head ``h`` of layer ``l`` (compatibility mode: LayerNorm folded into
``W_Q/W_K/W_V``, ``b_V`` folded into ``b_O``), prompt ``b`` and answer position ``q``::

    x_s = blocks.{l}.ln1.hook_normalized[b, s]                 # [d_model], normalised residual
    v_s = x_s W_V[h] + b_V[h] = blocks.{l}.attn.hook_v[b, s, h] # [d_head]  (GQA: kv head h // group)
    u_s = v_s W_O[h]                                            # [d_model] = W_OV x_s
    o_q = z[b, q, h] W_O[h] = sum_s A[q, s] u_s                 # the head's output, b_O excluded

``b_O`` is shared by all heads and not attributed (``hook_attn_out = sum_h o_q,h + b_O``). The sum
over sources ``s`` is split by each position's **role** (:data:`ROLE_NAMES`: BOS/template, demo key,
demo arrow, demo label, demo separator, query key, final arrow) and by **demo** (the index of the demo
a position belongs to): ``c_D = sum_{s in demos} A[q,s] u_s`` (the demo part) and ``c_0 = o_q - c_D``
(the zero-shot part: template and query). The parts add up to ``o_q`` to float precision (tested
against TransformerLens's ``hook_z @ W_O`` to 1e-5).

**Fast-weight matrices** (the linear-attention dual form, Dai et al. eq. 7-9). With ``q~`` and
``k~_s`` the query and keys that enter the scores (after rotary where the model has it) and
``score_s = q~ . k~_s / sqrt(d_head)`` (the model's own pre-softmax scores; checked at run time)::

    dW_lin  = sum_{s in demos}           u_s k~_s^T / sqrt(d_head)      # [d_model, d_head]
    dW_soft = sum_{s in demos} A[q, s] * u_s k~_s^T / sqrt(d_head)

so ``dW_lin q~ = sum_s score_s u_s`` is unnormalised linear attention over the demos (no softmax,
no ``1/Z``), and ``dW_soft q~ = sum_s A[q,s] score_s u_s`` keeps softmax's choice of demo tokens at
this query. Neither equals ``c_D`` in general: softmax is not linear. How close each comes is
reported as the mean cosine with ``c_D`` and as the explained variance over prompts,
``EV = 1 - sum_b |c_D,b - a p_b|^2 / sum_b |c_D,b - mean_b c_D|^2`` with one least-squares scalar
``a`` per head (the dual form fixes the direction, not the scale). Effective rank of a matrix with
singular values ``sigma``: the participation ratio ``(sum sigma^2)^2 / sum sigma^4`` and the
smallest ``r`` holding 90% of ``sum sigma^2``.

**Readout** (logit lens): ``c_D / scale_final[b, q] @ W_U`` with TransformerLens's centred
unembedding (so a token's logit is relative to the vocabulary mean). ``answer_dla`` is that logit
for the answer, minus the contrast's when contrasts are given. **Task vector** (as function vectors,
Todd et al. 2024): ``sum over chosen heads of mean_b c_D`` -- a ``[d_model]`` residual-stream vector.

Sign convention: shares are projections on the head output, ``share_r = <c_r, o_q> / |o_q|^2``; they
sum to 1 over roles; positive means the part points the way the head writes.

Cost: one forward caching the chosen heads' layers, then per head ``O(batch * pos * d_head^2)``
(every sum over sources runs in the ``d_head``-dimensional value space ``v_s = hook_v``, which is
``x_s W_V + b_V``, and is mapped through ``W_O`` once) plus ``O(batch * n_parts * d_head * d_model)``.
Fast weights are stored factored (``dW = W_O^T M``, ``M`` is ``[d_head, d_head]``); their spectra come
from the ``[d_head, d_head]`` Gram matrix ``(R M)^T (R M)`` with ``W_O^T = Q R`` (same singular values).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from icl_circuits.errors import ICLCircuitsError, InputError
from icl_circuits.models import attention
from icl_circuits.results import PALETTE, Result, series_colors
from icl_circuits.shapes import Head, all_heads, check_model_heads, expand_kv
from icl_circuits.tasks.roles import ROLE_NAMES, PromptRoles, roles_from_prompts, roles_from_tokens

__all__ = [
    "ROLE_NAMES", "Decomposition", "FastWeights", "PromptRoles", "decompose", "effective_rank", "logit_lens",
    "parse_heads", "reconstruction", "roles_from_prompts", "roles_from_tokens", "summarize", "task_vector",
]  # fmt: skip

DEMO_ROLES: tuple[int, ...] = (1, 2, 3, 4)  # demo_key, demo_arrow, demo_label, demo_sep


# ---------------------------------------------------------------- the decomposition


@dataclass(frozen=True)
class Decomposition:
    """The chosen heads' outputs at the query, split exactly, and their fast-weight matrices.

    ``per_role [batch, head, role, d_model]``, ``per_demo [batch, head, demo, d_model]``,
    ``head_out [batch, head, d_model]`` (TransformerLens's ``hook_z @ W_O``), ``demo_attention
    [batch, head]`` (``sum_{s in demos} A[q,s]``), ``final_scale [batch]`` (``ln_final``'s scale at
    the query, for the logit lens), ``fw_lin_query`` / ``fw_soft_query [batch, head, d_model]`` (each
    fast weight applied to ``q~``).

    The fast weights are stored factored, ``dW = W_O^T M`` with ``M_lin`` / ``M_soft [batch, head,
    d_head, d_head] = sum_s (weight_s) v_s k~_s^T / sqrt(d_head)`` and ``W_O [head, d_head, d_model]``:
    :attr:`fw_lin` builds the ``[batch, head, d_model, d_head]`` matrix on request, and
    :meth:`fw_isometric` gives ``R M`` (``W_O^T = Q R``, ``Q`` with orthonormal columns), which has the
    same singular values, norms and differences as ``dW`` at ``d_head / d_model`` of the size.
    """

    heads: tuple[Head, ...]
    per_role: torch.Tensor
    per_demo: torch.Tensor
    head_out: torch.Tensor
    M_lin: torch.Tensor
    M_soft: torch.Tensor
    W_O: torch.Tensor
    fw_lin_query: torch.Tensor
    fw_soft_query: torch.Tensor
    demo_attention: torch.Tensor
    final_scale: torch.Tensor

    @property
    def fw_lin(self) -> torch.Tensor:
        """``dW_lin [batch, head, d_model, d_head] = W_O^T M_lin``."""
        return torch.einsum("hed,bhef->bhdf", self.W_O, self.M_lin)

    @property
    def fw_soft(self) -> torch.Tensor:
        """``dW_soft [batch, head, d_model, d_head] = W_O^T M_soft``."""
        return torch.einsum("hed,bhef->bhdf", self.W_O, self.M_soft)

    def fw_isometric(self, kind: str = "lin") -> torch.Tensor:
        """``R M [batch, head, d_head, d_head]``: ``dW`` up to the isometry ``Q`` (same spectrum and norms)."""
        if kind not in ("lin", "soft"):
            raise InputError(f"kind must be 'lin' or 'soft', got {kind!r}")
        gram = self.W_O.double() @ self.W_O.transpose(1, 2).double()  # W_O W_O^T = R^T R
        L, info = torch.linalg.cholesky_ex(gram)
        R = L.mT if not bool(info.any()) else torch.linalg.qr(self.W_O.transpose(1, 2).double()).R  # rank-deficient W_O
        return torch.einsum("hef,bhfg->bheg", R.float(), self.M_lin if kind == "lin" else self.M_soft)

    def singular_values(self, kind: str = "lin") -> torch.Tensor:
        """``[batch, head, d_head]`` singular values of ``dW`` (descending), from the eigenvalues of its
        Gram matrix ``M^T W_O W_O^T M`` in float64 (batched CPU SVDs are far slower; values below
        ~1e-7 of the largest lose relative precision)."""
        X = self.fw_isometric(kind).double()
        eig = torch.linalg.eigvalsh(X.mT @ X).clamp_min(0).sqrt()
        return eig.flip(-1).float()

    @property
    def demo_part(self) -> torch.Tensor:
        """``c_D [batch, head, d_model]``: the demo positions' contribution."""
        return self.per_role[:, :, list(DEMO_ROLES)].sum(2)

    @property
    def zero_shot_part(self) -> torch.Tensor:
        """``c_0 [batch, head, d_model]``: template and query positions."""
        keep = [r for r in range(len(ROLE_NAMES)) if r not in DEMO_ROLES]
        return self.per_role[:, :, keep].sum(2)

    def sum_error(self) -> float:
        """Largest ``|sum of roles - head_out|`` entry (float precision when the split is exact)."""
        return float((self.per_role.sum(2) - self.head_out).abs().max())

    def shares(self, parts: torch.Tensor) -> torch.Tensor:
        """``<part, o> / |o|^2`` for ``parts [batch, head, n, d_model]`` -> ``[batch, head, n]``."""
        o = self.head_out[:, :, None]
        return (parts * o).sum(-1) / o.pow(2).sum(-1).clamp_min(1e-30)

    def index(self, head: Head) -> int:
        if head not in self.heads:
            raise InputError(f"head {head} was not decomposed; decomposed: {list(self.heads)}")
        return self.heads.index(head)


def parse_heads(spec: str | Sequence[Head] | None, model: Any) -> list[Head]:
    """``"L.H,L.H"`` or a list of ``(layer, head)`` -> validated heads (``None``: every head).

    Raises:
        InputError: malformed names or heads outside the model.
    """
    if spec is None:
        return all_heads(model)
    if isinstance(spec, str):
        heads = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            try:
                l, h = (int(x) for x in part.split("."))
            except ValueError:
                raise InputError(f"head {part!r} is not LAYER.HEAD (e.g. 1.3)") from None
            heads.append((l, h))
    else:
        heads = list(spec)
    if not heads:
        raise InputError(f"no head given ({spec!r}); name at least one as LAYER.HEAD")
    return check_model_heads(model, heads)


def score_scale(model: Any) -> float:
    """The attention-score divisor: ``cfg.attn_scale`` where set, else ``sqrt(d_head)``."""
    scale = getattr(model.cfg, "attn_scale", None)
    return float(scale) if isinstance(scale, (int, float)) and scale > 0 else float(model.cfg.d_head) ** 0.5


@torch.no_grad()
def decompose(
    model: Any, tokens: torch.Tensor, roles: PromptRoles, heads: Sequence[Head] | None = None
) -> Decomposition:
    """Split the chosen heads' outputs at each prompt's query position by role and demo (see module doc).

    Args:
        tokens: ``[batch, pos]`` prompts (right-padded; the query is at ``roles.last_positions``).
        roles: positions' roles, e.g. from :func:`roles_from_tokens` or :func:`roles_from_prompts`.
        heads: ``(layer, head)`` pairs; default every head.

    Raises:
        InputError: shapes that disagree.
        ICLCircuitsError: a model whose scores are not ``q~ . k~ / scale`` (the dual form assumes it).
    """
    if tokens.ndim != 2 or tokens.shape != roles.roles.shape:
        raise InputError(
            f"tokens {tuple(tokens.shape)} and roles {tuple(roles.roles.shape)} must be the same [batch, pos]"
        )
    hs = parse_heads(heads, model)
    layers = sorted({l for l, _ in hs})
    n_heads, scale = int(model.cfg.n_heads), score_scale(model)
    wanted = {"ln_final.hook_scale"}
    for l in layers:
        wanted |= {f"blocks.{l}.attn.{n}" for n in ("hook_pattern", "hook_v", "hook_z", "hook_attn_scores")}
        wanted |= set(attention.hook_names(l))
    device = getattr(model.cfg, "device", None) or "cpu"
    _, cache = model.run_with_cache(tokens.to(device), names_filter=lambda n: n in wanted)
    batch, n_roles, n_demos = tokens.shape[0], len(ROLE_NAMES), max(roles.n_demos, 1)
    bidx, last = torch.arange(batch), roles.last_positions.cpu()
    role_1h = torch.nn.functional.one_hot(roles.roles.clamp_min(0), n_roles).float() * (roles.roles >= 0)[..., None]
    demo_1h = torch.nn.functional.one_hot(roles.demo_index.clamp_min(0), n_demos).float()
    demo_1h = demo_1h * (roles.demo_index >= 0)[..., None]
    in_demo = (roles.demo_index >= 0).float()  # [batch, pos]
    causal = torch.arange(tokens.shape[1])[None] <= last[:, None]
    parts: dict[Head, tuple[torch.Tensor, ...]] = {}
    W_O_all = model.W_O.detach().float().cpu()  # the bridge stacks all layers on each access: read once
    for l in layers:
        idx = [h for ll, h in hs if ll == l]  # this layer's chosen heads, as head dim H'
        W_O = W_O_all[l, idx]  # [H', d_head, d_model]
        # every sum over sources runs in the d_head-dimensional value space, then goes through W_O once
        v = expand_kv(cache[f"blocks.{l}.attn.hook_v"], n_heads, dim=2)[:, :, idx].float().cpu()  # [b, s, H', e]
        A = cache[f"blocks.{l}.attn.hook_pattern"][bidx, :, last][:, idx].float().cpu()  # [b, H', s]
        Av = A.transpose(1, 2)[..., None] * v  # [b, s, H', e]
        role = torch.einsum("bshe,bsr,hed->bhrd", Av, role_1h, W_O)
        demo = torch.einsum("bshe,bsn,hed->bhnd", Av, demo_1h, W_O)
        o = torch.einsum("bhe,hed->bhd", cache[f"blocks.{l}.attn.hook_z"][bidx, last][:, idx].float().cpu(), W_O)
        qe, ke = attention.score_vectors(model, cache, l)  # as they enter the scores (rotated where rotary)
        q = expand_kv(qe, n_heads, dim=2)[bidx, last][:, idx].float().cpu()  # [b, H', e]
        k = expand_kv(ke, n_heads, dim=2)[:, :, idx].float().cpu()  # [b, s, H', e]
        model_scores = cache[f"blocks.{l}.attn.hook_attn_scores"][bidx, :, last][:, idx].float().cpu()  # [b, H', s]
        model_scores = model_scores.masked_fill(~causal[:, None], float("-inf"))
        check_dot_product_scores(l, torch.einsum("bhe,bshe->bhs", q, k) / scale, model_scores, scale)
        seen = (in_demo[:, None] * torch.isfinite(model_scores)).transpose(1, 2)[..., None]  # [b, s, H', 1]
        M_lin = torch.einsum("bshe,bshf->bhef", v * seen, k) / scale  # [b, H', e, e]
        M_soft = torch.einsum("bshe,bshf->bhef", Av * seen, k) / scale
        linq = torch.einsum("bhef,bhf,hed->bhd", M_lin, q, W_O)
        softq = torch.einsum("bhef,bhf,hed->bhd", M_soft, q, W_O)
        att = (A * in_demo[:, None]).sum(-1)  # [b, H']
        for j, h in enumerate(idx):
            parts[(l, h)] = tuple(t[:, j] for t in (role, demo, o, M_lin, M_soft, linq, softq, att))
    final_scale = cache["ln_final.hook_scale"][bidx, last].float().cpu().reshape(batch)
    st = [torch.stack([parts[hd][i] for hd in hs], dim=1) for i in range(8)]
    W_O_heads = torch.stack([W_O_all[l, h] for l, h in hs])
    return Decomposition(
        tuple(hs), st[0], st[1][:, :, : roles.n_demos], st[2], st[3], st[4], W_O_heads, st[5], st[6], st[7], final_scale
    )


def check_dot_product_scores(layer: int, ours: torch.Tensor, scores: torch.Tensor, scale: float) -> None:
    """Raise unless the model's attention ``scores`` equal ``ours = q~.k~ / scale`` wherever they are finite
    (masked positions, causal or outside a sliding window, are ``-inf``); both ``[..., pos]``."""
    seen = torch.isfinite(scores)
    gap = float((ours - scores).abs()[seen].amax()) if bool(seen.any()) else 0.0
    if gap > 1e-3 * (1.0 + float(scores[seen].abs().amax() if bool(seen.any()) else 0.0)):
        raise ICLCircuitsError(
            f"layer {layer}: the model's attention scores differ from q.k/{scale:.3g} by {gap:.3g}; the dual "
            "form needs plain dot-product scores (no ALiBi, attention soft-capping or per-layer scaling); head scans, "
            "exact patching, AtP on z and attribution do not need it and work on such models (README, Architectures)"
        )


# ---------------------------------------------------------------- measures (pure)


def effective_rank(sigma: torch.Tensor, energy: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """``sigma [..., r]`` -> (participation ratio ``(sum s^2)^2 / sum s^4``, smallest rank holding
    ``energy`` of ``sum s^2``), each ``[...]``. A zero matrix has both 0."""
    if not 0.0 < energy <= 1.0:
        raise InputError(f"energy must be in (0, 1], got {energy}")
    s2 = sigma.float().pow(2)
    tot = s2.sum(-1)
    pr = tot.pow(2) / s2.pow(2).sum(-1).clamp_min(1e-30)
    frac = s2.sort(-1, descending=True).values.cumsum(-1) / tot.clamp_min(1e-30)[..., None]
    r = (frac < energy - 1e-6).sum(-1) + 1
    zero = tot <= 0
    return torch.where(zero, torch.zeros_like(pr), pr), torch.where(zero, torch.zeros_like(r), r)


def reconstruction(target: torch.Tensor, pred: torch.Tensor) -> tuple[float, float]:
    """``target, pred [batch, d]`` -> (mean cosine, explained variance with one least-squares scalar).

    ``EV = 1 - sum_b |t_b - a p_b|^2 / sum_b |t_b - mean t|^2``, ``a = sum <t, p> / sum |p|^2``.
    """
    if target.shape != pred.shape or target.ndim != 2:
        raise InputError(f"target and pred must be the same [batch, d], got {tuple(target.shape)}, {tuple(pred.shape)}")
    t, p = target.double(), pred.double()
    cos = torch.nn.functional.cosine_similarity(t, p, dim=-1, eps=1e-30).mean()
    a = (t * p).sum() / p.pow(2).sum().clamp_min(1e-300)
    total = (t - t.mean(0)).pow(2).sum()
    ev = 1.0 - (t - a * p).pow(2).sum() / total if total > 0 else torch.tensor(float("nan"))
    return float(cos), float(ev)


def logit_lens(model: Any, vectors: torch.Tensor, final_scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``vectors [..., d_model]`` -> logits ``[..., d_vocab]``: ``(v / final_scale) @ W_U`` (centred W_U, no b_U)."""
    W_U = model.W_U.detach().float().cpu()
    scale = final_scale if isinstance(final_scale, float) else final_scale.float()[..., None]
    return (vectors.float() / scale) @ W_U


def task_vector(dec: Decomposition, heads: Sequence[Head] | None = None) -> torch.Tensor:
    """``[d_model]``: sum over ``heads`` (default all decomposed) of the mean demo contribution."""
    idx = [dec.index(h) for h in (heads if heads is not None else dec.heads)]
    return dec.demo_part[:, idx].mean(0).sum(0)


# ---------------------------------------------------------------- the result


@dataclass(frozen=True)
class FastWeights(Result):
    """Per-head fast-weight measures over a batch of prompts (means over prompts).

    ``rows``: one dict per head (see :meth:`to_dataframe`); ``role_shares [head, role]`` and
    ``demo_shares [head, demo]`` (mean projection shares, roles sum to 1); ``demo_dla [head, demo]``
    (mean answer logit of each demo's contribution); ``spectra [head, r]`` (mean sorted singular values
    of ``dW_lin``); ``top_tokens``: per head, the tokens the mean demo contribution promotes most.
    """

    model: str
    task: str
    shots: int
    heads: tuple[Head, ...]
    rows: tuple[dict[str, Any], ...]
    role_shares: torch.Tensor
    demo_shares: torch.Tensor
    demo_dla: torch.Tensor
    spectra: torch.Tensor
    soft_spectra: torch.Tensor
    top_tokens: tuple[tuple[str, ...], ...]
    n_prompts: int
    max_sum_error: float

    title = "Fast weights by head"

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        import pandas as pd

        df = pd.DataFrame([{k: v for k, v in r.items() if k != "singular_values"} for r in self.rows])
        return df.assign(top_tokens=[" ".join(t) for t in self.top_tokens])

    def to_dict(self) -> dict[str, Any]:
        """The fast-weight part of ``fast_weights.json``: settings and one entry per head (:meth:`head_dicts`)."""
        return {"model": self.model, "task": self.task, "shots": self.shots, "n_prompts": self.n_prompts,
                "sum_check_max_abs_error": self.max_sum_error, "heads": self.head_dicts()}  # fmt: skip

    def head_dicts(self) -> list[dict[str, Any]]:
        """The JSON ``heads`` entries (layer, head, effective_rank, singular_values, reconstruction_cosine, ...)."""
        return [dict(r) for r in self.rows]

    def best(self, n: int, key: str = "answer_dla") -> list[Head]:
        """The ``n`` heads with the largest ``key`` (default: the demo part's answer logit)."""
        order = sorted(range(len(self.rows)), key=lambda i: -float(self.rows[i][key]))
        return [self.heads[i] for i in order[:n]]

    def figures(self, max_heads: int = 8) -> list[Any]:  # list[plotly Figure]
        """[singular spectra of dW_lin, role shares, per-demo contributions] for the ``max_heads``
        heads with the largest demo answer logit. Pure: returns the figures."""
        import plotly.graph_objects as go

        chosen = [self.heads.index(h) for h in self.best(max_heads)]
        names = [f"L{self.heads[i][0]}H{self.heads[i][1]}" for i in chosen]
        colour = series_colors(names)
        spec = go.Figure()
        for i, name in zip(chosen, names):
            s = self.spectra[i].tolist()
            spec.add_trace(go.Scatter(x=list(range(1, len(s) + 1)), y=s, mode="lines+markers", name=name,
                                      line={"color": colour[name]}))  # fmt: skip
        spec.update_layout(title=f"Singular values of dW_lin (mean over {self.n_prompts} prompts, {self.shots} shots)",
                           xaxis_title="index", yaxis_title="singular value", yaxis_type="log")  # fmt: skip
        roles = go.Figure([go.Bar(name=r, x=names, y=self.role_shares[chosen, j].tolist(),
                                  marker_color=PALETTE[-1 - j % len(PALETTE)])
                           for j, r in enumerate(ROLE_NAMES)])  # fmt: skip
        roles.update_layout(barmode="relative", title="Share of the head output by source role (sums to 1)",
                            yaxis_title="<c_role, o> / |o|^2")  # fmt: skip
        demos = go.Figure([go.Bar(name=n, x=[f"demo {d + 1}" for d in range(self.demo_dla.shape[1])],
                                  y=self.demo_dla[i].tolist(), marker_color=colour[n])
                           for i, n in zip(chosen, names)])  # fmt: skip
        demos.update_layout(barmode="group", title="Answer logit (logit lens) of each demo's contribution",
                            yaxis_title="logit of the answer" + (" - contrast" if self._contrast else ""))  # fmt: skip
        return [spec, roles, demos]

    @property
    def _contrast(self) -> bool:
        return bool(self.rows and self.rows[0].get("contrast", False))

    def _repr_html_(self) -> str:
        head = (f"<b>Fast weights</b> of <code>{self.model}</code> on {self.task}, {self.shots} shots, "
                f"{self.n_prompts} prompts (sum check {self.max_sum_error:.1e})")  # fmt: skip
        return head + self.to_dataframe().to_html(index=False, float_format="%.3f")


def summarize(
    model: Any,
    dec: Decomposition,
    answer_ids: torch.Tensor,
    contrast_ids: torch.Tensor | None = None,
    *,
    task: str = "",
    shots: int = -1,
    top_k: int = 5,
) -> FastWeights:
    """Measures of :func:`decompose`'s output: spectra, effective rank, reconstruction, shares, logit lens.

    ``answer_ids``/``contrast_ids [batch]``: the answer (and contrast) token of each prompt.
    """
    from icl_circuits.models import model_info

    batch = dec.head_out.shape[0]
    if answer_ids.shape != (batch,) or (contrast_ids is not None and contrast_ids.shape != (batch,)):
        raise InputError(f"answer_ids/contrast_ids must be [{batch}], got {tuple(answer_ids.shape)}")
    W_U = model.W_U.detach().float().cpu()
    direction = W_U[:, answer_ids.cpu()].T  # [batch, d_model]
    if contrast_ids is not None:
        direction = direction - W_U[:, contrast_ids.cpu()].T
    direction = direction / dec.final_scale[:, None]
    c_D = dec.demo_part
    sig = dec.singular_values("lin")  # [batch, head, d_head]: the spectrum of dW_lin
    sig_soft = dec.singular_values("soft")
    pr, r90 = effective_rank(sig)
    pr_s, _ = effective_rank(sig_soft)
    role_sh, demo_sh = dec.shares(dec.per_role), dec.shares(dec.per_demo)
    demo_dla = torch.einsum("bhnd,bd->bhn", dec.per_demo, direction)
    lens = logit_lens(model, c_D.mean(0), float(dec.final_scale.mean()))  # [head, vocab]
    tok = getattr(model, "tokenizer", None)
    rows, tops = [], []
    for i, (l, h) in enumerate(dec.heads):
        cos, ev = reconstruction(c_D[:, i], dec.fw_lin_query[:, i])
        cos_s, ev_s = reconstruction(c_D[:, i], dec.fw_soft_query[:, i])
        rows.append({
            "layer": l, "head": h,
            "effective_rank": float(pr[:, i].mean()), "rank90": float(r90[:, i].float().mean()),
            "singular_values": [round(float(x), 6) for x in sig[:, i].mean(0)],
            "soft_effective_rank": float(pr_s[:, i].mean()),
            "reconstruction_cosine": cos, "explained_variance": ev,
            "soft_reconstruction_cosine": cos_s, "soft_explained_variance": ev_s,
            "demo_share": float(role_sh[:, i, list(DEMO_ROLES)].sum(-1).mean()),
            "demo_attention": float(dec.demo_attention[:, i].mean()),
            "demo_norm": float(c_D[:, i].norm(dim=-1).mean()),
            "head_norm": float(dec.head_out[:, i].norm(dim=-1).mean()),
            "answer_dla": float((c_D[:, i] * direction).sum(-1).mean()),
            "contrast": contrast_ids is not None,
        })  # fmt: skip
        ids = lens[i].topk(top_k).indices.tolist()
        tops.append(tuple(tok.convert_ids_to_tokens(ids) if tok is not None else [str(t) for t in ids]))
    return FastWeights(
        model_info(model).spec, task, shots, dec.heads, tuple(rows), role_sh.mean(0), demo_sh.mean(0),
        demo_dla.mean(0), sig.mean(0), sig_soft.mean(0), tuple(tops), batch, dec.sum_error(),
    )  # fmt: skip
