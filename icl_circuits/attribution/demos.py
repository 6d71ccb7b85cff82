"""Per-demo attribution: which demonstrations (and which of their tokens) a head reads from.

A head's output at the answer position ``t`` is a sum over source positions (Elhage et al. 2021,
"A Mathematical Framework for Transformer Circuits")::

    out_t = sum_s A[t, s] * v_s @ W_O            (A: the head's attention pattern)

Each term is read two ways:

* ``dla [head, batch, pos]``: its direct logit attribution to the logit difference,
  ``LN_final(term) . (W_U[:, answer] - W_U[:, contrast])``, with the final LayerNorm frozen at the
  clean run's scale (centred for LayerNorm models, not for RMSNorm ones). Over ``s`` the terms sum to
  the head's own direct logit attribution (TransformerLens ``cache.logit_attrs`` of
  ``stack_head_results``, tested).
* ``norm [head, batch, pos]``: ``||A[t, s] v_s W_O||`` (Kobayashi et al. 2020, "Attention is Not Only a
  Weight"): how much the position moves, metric-free.

:class:`~icl_circuits.tasks.roles.PromptRoles` then groups positions by demonstration (``by_demo``)
and by token role (``by_role``: key, arrow, label, separator, query, template).

Cost: one forward with a cache of the chosen layers' patterns and values.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from icl_circuits.errors import InputError
from icl_circuits.patching.resume import answer_direction
from icl_circuits.results import Result
from icl_circuits.shapes import check_heads
from icl_circuits.tasks.roles import ROLE_NAMES, PromptRoles

KINDS = ("dla", "norm")


@dataclass(frozen=True)
class DemoAttribution(Result):
    """Per source position contributions of ``heads`` at each prompt's answer position.

    ``dla``/``norm [head, batch, pos]`` (0 at padding and after the answer position), ``roles`` of
    the prompts, ``head_dla [head, batch]`` (the head's whole direct logit attribution, = ``dla`` summed
    over positions).
    """

    heads: tuple[tuple[int, int], ...]
    dla: torch.Tensor
    norm: torch.Tensor
    head_dla: torch.Tensor
    roles: PromptRoles

    title = "Per-demo attribution"

    def _values(self, kind: str) -> torch.Tensor:
        if kind not in KINDS:
            raise InputError(f"kind must be one of {KINDS}, got {kind!r}")
        return self.dla if kind == "dla" else self.norm

    def by_demo(self, kind: str = "dla") -> torch.Tensor:
        """``[head, demo]``: the summed contribution of each demo's tokens, mean over the batch."""
        vals, demo = self._values(kind), self.roles.demo_index
        n = self.roles.n_demos
        onehot = (demo[..., None] == torch.arange(n)).to(vals)  # [batch, pos, demo], on vals' device
        return torch.einsum("hbp,bpd->hd", vals, onehot) / vals.shape[1]

    def by_role(self, kind: str = "dla") -> torch.Tensor:
        """``[head, role]`` over :data:`~icl_circuits.tasks.roles.ROLE_NAMES`, mean over the batch."""
        vals, roles = self._values(kind), self.roles.roles
        onehot = (roles[..., None] == torch.arange(len(ROLE_NAMES))).to(vals)
        return torch.einsum("hbp,bpr->hr", vals, onehot) / vals.shape[1]

    def to_dataframe(self, kind: str = "dla") -> Any:
        """One row per (head, demo) and per (head, role): ``head``, ``group``, ``name``, ``value``."""
        import pandas as pd

        rows = []
        demo, role = self.by_demo(kind), self.by_role(kind)
        for i, (l, h) in enumerate(self.heads):
            for d in range(demo.shape[1]):
                rows.append({"head": f"L{l}H{h}", "group": "demo", "name": f"demo {d + 1}", kind: float(demo[i, d])})
            for r, name in enumerate(ROLE_NAMES):
                rows.append({"head": f"L{l}H{h}", "group": "role", "name": name, kind: float(role[i, r])})
        return pd.DataFrame(rows)

    def plot(self, kind: str = "dla") -> Any:
        """Heatmap head x (demo 1..n, then roles): mean contribution to the logit difference (``dla``)."""
        import plotly.graph_objects as go

        demo, role = self.by_demo(kind), self.by_role(kind)
        z = torch.cat([demo, role], dim=1).float()
        x = [f"demo {d + 1}" for d in range(demo.shape[1])] + [f"[{r}]" for r in ROLE_NAMES]
        y = [f"L{l}H{h}" for l, h in self.heads]
        bound = float(z.abs().max()) or 1.0
        what = "direct logit attribution (answer - contrast)" if kind == "dla" else "norm of A v W_O"
        fig = go.Figure(go.Heatmap(z=z.numpy(), x=x, y=y, colorscale="RdBu" if kind == "dla" else "Blues",
                                   zmid=0.0 if kind == "dla" else None, zmin=-bound if kind == "dla" else 0,
                                   zmax=bound, colorbar={"title": kind}))  # fmt: skip
        fig.update_layout(title=f"What each head reads at the answer position, by demo and by token role: {what}",
                          xaxis_title="source", yaxis_title="head", yaxis_autorange="reversed")  # fmt: skip
        return fig

    def _repr_html_(self) -> str:
        from icl_circuits.report import table_html

        df = self.to_dataframe().pivot_table(index="head", columns="name", values="dla", sort=False)
        title = html.escape(f"per-demo attribution of {len(self.heads)} heads (direct logit attribution)")
        return f"<div><pre>{title}</pre>{table_html(df)}</div>"

    def to_dict(self) -> dict[str, Any]:
        return {
            "heads": [list(h) for h in self.heads],
            "by_demo_dla": self.by_demo("dla").tolist(), "by_role_dla": self.by_role("dla").tolist(),
            "by_demo_norm": self.by_demo("norm").tolist(), "by_role_norm": self.by_role("norm").tolist(),
            "roles": list(ROLE_NAMES), "head_dla": self.head_dla.mean(-1).tolist(),
        }  # fmt: skip


@torch.no_grad()
def demo_attribution(
    model: Any,
    tokens: torch.Tensor,
    answer_tokens: torch.Tensor,
    contrast_tokens: torch.Tensor,
    heads: Sequence[tuple[int, int]],
    roles: PromptRoles,
) -> DemoAttribution:
    """Decompose each head's output at the answer position by source position (see the module docstring).

    Args:
        tokens: ``[batch, pos]`` prompts (right-padded); ``roles.last_positions`` is each answer position.
        answer_tokens, contrast_tokens: ``[batch]``; the logit difference the ``dla`` reading explains.
        heads: ``(layer, head)`` pairs.

    Raises:
        InputError: shapes that do not match, or a head outside the model.
    """
    n_layers, n_heads = int(model.cfg.n_layers), int(model.cfg.n_heads)
    if tokens.ndim != 2 or roles.roles.shape != tokens.shape:
        raise InputError(f"tokens [batch, pos] and roles must match, got {list(tokens.shape)} "
                         f"and {list(roles.roles.shape)}")  # fmt: skip
    batch = tokens.shape[0]
    if answer_tokens.shape != (batch,) or contrast_tokens.shape != (batch,):
        raise InputError(f"answer_tokens and contrast_tokens must be [batch={batch}]")
    heads = check_heads(heads, n_layers, n_heads, allow_empty=False)
    layers = sorted({l for l, _ in heads})
    names = {f"blocks.{l}.attn.hook_{a}" for l in layers for a in ("pattern", "v")} | {"ln_final.hook_scale"}
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    rows, last = torch.arange(batch), roles.last_positions
    scale = cache["ln_final.hook_scale"][rows, last]  # [batch, 1]
    direction, _ = answer_direction(model, answer_tokens, contrast_tokens)  # [batch, d_model]
    centre = str(getattr(model.cfg, "normalization_type", "LN")).startswith("LN")
    valid = ((roles.roles >= 0) & (torch.arange(tokens.shape[1]) <= last[:, None])).to(scale.device)  # [batch, pos]
    dla, norm = [], []
    for l, h in heads:
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][rows, h, last]  # [batch, pos]
        v = cache[f"blocks.{l}.attn.hook_v"]  # [batch, pos, kv_head, d_head]
        v_h = v[:, :, h * v.shape[2] // n_heads]
        terms = (pattern[..., None] * v_h) @ model.W_O[l, h]  # [batch, pos, d_model]
        norm.append(terms.norm(dim=-1) * valid)
        if centre:
            terms = terms - terms.mean(-1, keepdim=True)
        d = (terms / scale[:, None]) @ direction[..., None]  # [batch, pos, 1]
        dla.append(d[..., 0] * valid)
    dla_t, norm_t = torch.stack(dla).float(), torch.stack(norm).float()
    return DemoAttribution(tuple((int(l), int(h)) for l, h in heads), dla_t, norm_t, dla_t.sum(-1), roles)
