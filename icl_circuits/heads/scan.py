"""The head scan: which heads do in-context learning, by the standard measures, with roles and the circuit.

:func:`scan_heads` measures every head (layer, head) of a model on repeated random tokens and
weights (see :mod:`icl_circuits.heads.scores` and :mod:`icl_circuits.heads.composition` for the definitions,
signs and costs), classifies heads into roles with the documented :class:`RoleThresholds`, and names
the circuit: which earlier heads feed each induction head, read two ways -- K-composition of the
weights (Elhage et al.; direct path only) and the induction score the head loses when each earlier
head is mean-ablated (every path, e.g. a previous-token signal routed through the first MLP).
Example::

    from icl_circuits import load_model
    from icl_circuits.heads.scan import scan_heads
    model = load_model("fixture:induction-2l")
    scan = scan_heads(model, seq_len=20, batch=16, seed=0)
    scan.to_dataframe().head()          # one row per head, ranked by induction score
    scan.induction_heads, scan.circuit  # [(1, 2), ...], [Feeders(...)]
    fig = scan.plot()                   # one Figure: the layer x head heatmaps (scan.heatmaps(): by metric)
    html = scan.attention_html(model)   # circuitsvis view of the top heads on one example

:func:`icl_circuits.heads.report.save_head_scan` writes ``head_scan.json`` (the schema other scripts
read) and the offline ``head_scan.html`` report.

Cost: two forwards of ``batch`` sequences for the attention scores, one ``|vocab| x d_model^2``
product for copying, about ``(L H)^2 d_model^2 / 4`` multiply-adds per composition mode, and, with
``ablation=True``, the mean-ablation sweep (:mod:`icl_circuits.patching.ablation`: each layer's heads
tiled into one batch resumed at that layer, about half a forward of the batch per head; it also gives
the ablation reading of the circuit). Its sign: ``effect = gain(ablated) - gain(clean)`` with the
in-context gain ``early - late`` in nats, so a negative effect = the head helps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from icl_circuits.errors import InputError
from icl_circuits.heads import composition as comp
from icl_circuits.heads import scores as hd
from icl_circuits.io import generator
from icl_circuits.models import model_info
from icl_circuits.patching.ablation import SIGN, InContextGain, mean_ablation_sweep
from icl_circuits.results import Result
from icl_circuits.shapes import check_heads
from icl_circuits.tasks.defaults import run_default

METRICS = ("induction", "prefix_matching", "previous_token", "duplicate_token", "copying", "ablation")
ROLES = ("induction", "previous-token", "duplicate-token", "copying")


@dataclass(frozen=True)
class RoleThresholds:
    """When a head gets a role. Values follow the field's practice, not any one model.

    * ``induction``: induction score ``>= induction`` (0.4: at least 40% of the attention of an average
      second-copy query on the offset stripe, the cut ARENA's detectors use), *and* evidence that the
      head acts on what it attends to -- Olsson et al. define an induction head by prefix matching
      *and* copying: OV eigenvalue positivity ``> min_copying`` (0: more copying than anti-copying),
      or, when the ablation sweep ran, mean-ablation effect ``< -min_ablation`` nats (removing it
      lowers the in-context gain ``early - late`` by more than ``min_ablation``: it helps). Either
      suffices: ``W_E``-only copying misses copying routed through the
      first MLP, and the ablation of one of several redundant heads can be ~0.
    * ``previous-token`` / ``duplicate-token``: their attention score ``>=`` 0.4, the same cut.
    * ``copying``: OV eigenvalue positivity ``>= copying`` (0.5; random matrices give ~``1/d_head``).
    * circuit, two readings per induction head R. Weights: an earlier head S feeds R when its
      K-composition stands out from random matrices of the same shapes by ``z >= feeder_min_z``
      standard deviations *and* its excess over the random mean is at least ``feeder_fraction`` of the
      largest excess into R (direct path only). Ablation: S feeds R when mean-ablating S lowers R's
      induction score by at least ``feeder_min_drop`` and by ``feeder_fraction`` of the largest drop
      (every path, including through MLPs).
    """

    induction: float = 0.4
    min_copying: float = 0.0
    min_ablation: float = 0.0
    previous_token: float = 0.4
    duplicate_token: float = 0.4
    copying: float = 0.5
    feeder_min_z: float = 3.0
    feeder_fraction: float = 0.5
    feeder_min_drop: float = 0.05

    def __post_init__(self) -> None:
        for name in ("induction", "previous_token", "duplicate_token", "feeder_fraction", "feeder_min_drop"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise InputError(f"RoleThresholds.{name} is an attention fraction in [0, 1], got {v}")
        for name in ("copying", "min_copying"):
            v = getattr(self, name)
            if not -1.0 <= v <= 1.0:
                raise InputError(f"RoleThresholds.{name} is an eigenvalue ratio in [-1, 1], got {v}")

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Feeders:
    """The earlier heads that feed one induction head, strongest first: by K-composition and by ablation."""

    receiver: tuple[int, int]
    feeders: tuple[tuple[int, int], ...]  # by K-composition (weights, direct path)
    k_composition: tuple[float, ...]
    z: tuple[float, ...]
    ablation_feeders: tuple[tuple[int, int], ...] = ()  # by mean ablation (every path); empty without the sweep
    induction_drop: tuple[float, ...] = ()  # receiver's induction score lost when each is ablated

    def describe(self) -> str:
        k = ", ".join(
            f"L{l}H{h} (K={c:.3f}, z={z:.1f})" for (l, h), c, z in zip(self.feeders, self.k_composition, self.z)
        )
        a = ", ".join(f"L{l}H{h} (-{d:.2f})" for (l, h), d in zip(self.ablation_feeders, self.induction_drop))
        return (f"L{self.receiver[0]}H{self.receiver[1]} <- K-composition: {k or 'no earlier head stands out'}; "
                f"ablation: {a or 'none'}")


@dataclass(frozen=True)
class HeadScan(Result):
    """Per-head scores ``[layer, head]`` (``ablation`` is ``None`` when the sweep was skipped) and their readings."""

    model: str
    seq_len: int
    batch: int
    seed: int
    prefix_repeats: int
    prefix_seq_len: int
    scores: dict[str, torch.Tensor]
    composition: dict[str, torch.Tensor]  # mode -> [L, H, L, H] (sender, receiver)
    baselines: dict[str, comp.Baseline]
    loss_early: float
    loss_late: float
    induction_change: torch.Tensor | None  # [L, H, L, H] (sender ablated, receiver) or None without the sweep
    tokens: torch.Tensor = field(repr=False)  # [batch, o + 2 * seq_len], the [BOS?, r, r] sequences (o = BOS or not)
    thresholds: RoleThresholds = field(default_factory=RoleThresholds)
    ablation_batch: int | None = None  # sequences of the ablation sweep (the first of tokens); None: no sweep
    timings: dict[str, float] = field(default_factory=dict, compare=False)  # stage -> seconds (wall clock)

    @property
    def layout(self) -> str:
        """``"[BOS, r, r]"`` when the sequences start with the model's BOS, else ``"[r, r]"``."""
        return "[BOS, r, r]" if int(self.tokens.shape[1]) > 2 * self.seq_len else "[r, r]"

    @property
    def n_layers(self) -> int:
        return int(self.scores["induction"].shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.scores["induction"].shape[1])

    @property
    def in_context_score(self) -> float:
        """Clean model: ``late - early`` loss in nats (negative = learns in context)."""
        return self.loss_late - self.loss_early

    def score(self, metric: str, layer: int, head: int) -> float | None:
        """One head's ``metric``; ``None`` when it was not measured (the ablation of a ``--no-ablation`` scan)."""
        v = self._value(metric, layer, head)
        return None if math.isnan(v) else v

    def _value(self, metric: str, layer: int, head: int) -> float:
        t = self.scores.get(metric)
        return float("nan") if t is None else float(t[layer, head])

    def roles(self, layer: int, head: int) -> list[str]:
        """The roles of one head under :attr:`thresholds` (see :class:`RoleThresholds`)."""
        th = self.thresholds
        v = {m: self._value(m, layer, head) for m in METRICS}
        out = []
        acts = v["copying"] > th.min_copying or v["ablation"] < -th.min_ablation  # NaN ablation: False
        if v["induction"] >= th.induction and acts:
            out.append("induction")
        if v["previous_token"] >= th.previous_token:
            out.append("previous-token")
        if v["duplicate_token"] >= th.duplicate_token:
            out.append("duplicate-token")
        if v["copying"] >= th.copying:
            out.append("copying")
        return out

    @property
    def all_heads(self) -> list[tuple[int, int]]:
        return [(l, h) for l in range(self.n_layers) for h in range(self.n_heads)]

    @property
    def induction_heads(self) -> list[tuple[int, int]]:
        """Heads with the induction role, by decreasing induction score."""
        found = [lh for lh in self.all_heads if "induction" in self.roles(*lh)]
        return sorted(found, key=lambda lh: -float(self.scores["induction"][lh]))

    def composition_receivers(self, n_top: int = 3) -> list[tuple[int, int]]:
        """Induction heads, plus the ``n_top`` highest induction scores above layer 0 (candidates)."""
        rest = sorted((lh for lh in self.all_heads if lh[0] > 0), key=lambda lh: -float(self.scores["induction"][lh]))
        out = list(self.induction_heads)
        out += [lh for lh in rest[:n_top] if lh not in out]
        return out

    def feeders(self, receiver: tuple[int, int]) -> Feeders:
        """Earlier heads whose K-composition into ``receiver`` stands out (see :class:`RoleThresholds`)."""
        l_r, h_r = receiver
        base = self.baselines["K"]
        k = self.composition["K"][:l_r, :, l_r, h_r]  # [l_r, H]
        excess = k - base.mean
        if excess.numel() == 0:
            return Feeders(receiver, (), (), ())  # layer 0: nothing earlier
        z = excess / base.std
        keep = (z >= self.thresholds.feeder_min_z) & (excess >= self.thresholds.feeder_fraction * excess.max())
        chosen = sorted(((l, h) for l, h in keep.nonzero().tolist()), key=lambda lh: -float(k[lh]))
        by_ablation: list[tuple[int, int]] = []
        drop = torch.zeros(0)  # cpu: empty placeholder, like the CPU scan results
        if self.induction_change is not None:
            drop = -self.induction_change[:l_r, :, l_r, h_r]  # [l_r, H]: induction score lost
            th = self.thresholds
            hit = (drop >= th.feeder_min_drop) & (drop >= th.feeder_fraction * drop.max())
            by_ablation = sorted(((l, h) for l, h in hit.nonzero().tolist()), key=lambda lh: -float(drop[lh]))
        return Feeders(
            receiver,
            tuple((int(l), int(h)) for l, h in chosen),
            tuple(float(k[lh]) for lh in chosen),
            tuple(float(z[lh]) for lh in chosen),
            tuple((int(l), int(h)) for l, h in by_ablation),
            tuple(float(drop[lh]) for lh in by_ablation),
        )

    @property
    def circuit(self) -> list[Feeders]:
        """For each induction head (layer >= 1), the earlier heads that feed it through K-composition."""
        return [self.feeders(r) for r in self.induction_heads if r[0] > 0]

    def to_dataframe(self) -> Any:
        """One row per head, ranked by induction score: layer, head, name, the six metrics, roles."""
        import pandas as pd

        rows = []
        for l, h in self.all_heads:
            row: dict[str, Any] = {"layer": l, "head": h, "name": f"L{l}H{h}"}
            for m in METRICS:
                v = self.score(m, l, h)
                row[m] = float("nan") if v is None else v
            row["roles"] = ", ".join(self.roles(l, h))
            rows.append(row)
        df = pd.DataFrame(rows)
        return df.sort_values(["induction", "layer", "head"], ascending=[False, True, True]).reset_index(drop=True)

    title = "Head scan"

    def figures(self) -> list[Any]:
        """The layer x head heatmaps of :meth:`heatmaps`, in the order of ``METRICS``."""
        return list(self.heatmaps().values())

    def findings(self) -> dict[str, Any]:
        """The induction heads, the in-context score and :meth:`summary` as the reading."""
        return {"induction_heads": ", ".join(f"L{l}H{h}" for l, h in self.induction_heads) or None,
                "max_induction_score": float(self.scores["induction"].max()),
                "in_context_score": self.in_context_score, "reading": self.summary()}  # fmt: skip

    def heatmaps(self) -> dict[str, Any]:
        """``{metric: plotly Figure}``: a layer x head heatmap per metric (ablation only when measured)."""
        import plotly.graph_objects as go

        figs = {}
        for m in METRICS:
            if m not in self.scores:
                continue
            z = self.scores[m].numpy()
            signed = m in ("copying", "ablation")
            fig = go.Figure(
                go.Heatmap(
                    z=z,
                    x=[f"H{h}" for h in range(self.n_heads)],
                    y=[f"L{l}" for l in range(self.n_layers)],
                    colorscale="RdBu" if signed else "Blues",
                    zmid=0.0 if signed else None,
                    zmin=-1.0 if m == "copying" else None if signed else 0.0,
                    zmax=None if m == "ablation" else 1.0,
                    hovertemplate="%{y}%{x}: %{z:.3f}<extra></extra>",
                )
            )
            fig.update_layout(
                title=_TITLES[m], xaxis_title="head", yaxis_title="layer", width=420, height=360,
                yaxis_autorange="reversed", margin={"l": 50, "r": 20, "t": 50, "b": 40},
            )
            figs[m] = fig
        return figs

    def plot_composition(self, mode: str = "K") -> Any:
        """Heatmaps from earlier heads into each induction-type receiver.

        ``mode`` ``"Q"``, ``"K"``, ``"V"``: composition as z against random matrices; ``"ablation"``: the
        receiver's induction score lost when each earlier head is mean-ablated (needs the sweep).
        """
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        if mode == "ablation":
            if self.induction_change is None:
                raise InputError("this scan ran without the ablation sweep (ablation=False)")
            matrix, label = -self.induction_change, "lost"
            title = "Induction score lost when the earlier head is mean-ablated"
        elif mode in comp.MODES:
            base = self.baselines[mode]
            matrix = (self.composition[mode] - base.mean) / base.std
            title, label = f"{mode}-composition (z vs random matrices)", "z"
        else:
            raise InputError(f"mode must be one of {(*comp.MODES, 'ablation')}, got {mode!r}")
        receivers = [r for r in self.composition_receivers() if r[0] > 0]
        titles = [f"into L{l}H{h}" for l, h in receivers]
        fig = make_subplots(rows=1, cols=max(1, len(receivers)), subplot_titles=titles)
        for i, (l, h) in enumerate(receivers):
            fig.add_trace(
                go.Heatmap(
                    z=matrix[:l, :, l, h].numpy(), x=[f"H{g}" for g in range(self.n_heads)],
                    y=[f"L{s}" for s in range(l)], coloraxis="coloraxis",
                    hovertemplate="from %{y}%{x}: " + label + "=%{z:.2f}<extra></extra>",
                ),
                row=1, col=i + 1,
            )
        fig.update_layout(
            title=title + " into the induction-type heads", coloraxis={"colorscale": "RdBu", "cmid": 0.0},
            height=320, width=max(420, 300 * len(receivers)),
        )
        return fig

    def attention_html(self, model: Any, heads: list[tuple[int, int]] | None = None, example: int = 0) -> str:
        """circuitsvis view (offline HTML) of ``heads`` (default: the top heads) on scan sequence ``example``."""
        from icl_circuits.report import attention_html

        heads = heads or self.top_heads()
        if not 0 <= example < self.tokens.shape[0]:
            raise InputError(f"example must be in 0..{self.tokens.shape[0] - 1}, got {example}")
        heads = check_heads(heads, self.n_layers, self.n_heads)
        ids = self.tokens[example : example + 1]
        names = sorted({f"blocks.{l}.attn.hook_pattern" for l, _ in heads})
        with torch.no_grad():
            _, cache = model.run_with_cache(ids.to(model.cfg.device), names_filter=lambda n: n in names)
        pattern = torch.stack([cache[f"blocks.{l}.attn.hook_pattern"][0, h].float().cpu() for l, h in heads])
        return attention_html(token_labels(model, ids[0]), pattern, [f"L{l}H{h}" for l, h in heads])

    def top_heads(self, n_induction: int = 4) -> list[tuple[int, int]]:
        """The ``n_induction`` highest induction scores, then the best previous-token head."""
        df = self.to_dataframe()
        top = [(int(r.layer), int(r.head)) for r in df.head(n_induction).itertuples()]
        prev = divmod(int(self.scores["previous_token"].argmax()), self.n_heads)
        return top + ([prev] if prev not in top else [])

    def to_dict(self) -> dict[str, Any]:
        """The ``head_scan.json`` document (plain JSON types; ``ablation`` null when not measured)."""
        heads = []
        for l, h in self.all_heads:
            entry: dict[str, Any] = {"layer": l, "head": h}
            entry.update({m: self.score(m, l, h) for m in METRICS})
            entry["roles"] = self.roles(l, h)
            heads.append(entry)
        pairs = []
        for l_r, h_r in self.composition_receivers():
            for l_s in range(l_r):
                for h_s in range(self.n_heads):
                    pair: dict[str, Any] = {"sender": [l_s, h_s], "receiver": [l_r, h_r]}
                    for mode in comp.MODES:
                        v = float(self.composition[mode][l_s, h_s, l_r, h_r])
                        base = self.baselines[mode]
                        pair[mode], pair[f"{mode}_z"] = v, (v - base.mean) / base.std
                    pairs.append(pair)
        return {
            "model": self.model,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch": self.batch,
            "ablation_batch": self.ablation_batch,
            "timings_s": dict(self.timings),
            "prefix_matching": {"repeats": self.prefix_repeats, "seq_len": self.prefix_seq_len},
            "heads": heads,
            "induction_heads": [list(lh) for lh in self.induction_heads],
            "thresholds": self.thresholds.to_dict(),
            "in_context": {"loss_early": self.loss_early, "loss_late": self.loss_late, "score": self.in_context_score},
            "ablation": {"metric": "in_context_gain", "unit": "nats", "sign": SIGN,
                         "metric_definition": "early - late: loss on first-copy minus second-copy targets"},
            "composition": {
                "baseline": {m: asdict(b) for m, b in self.baselines.items()},
                "pairs": pairs,
            },
            "circuit": [
                {
                    "induction_head": list(f.receiver),
                    "feeders": [list(lh) for lh in f.feeders],
                    "k_composition": list(f.k_composition),
                    "k_composition_z": list(f.z),
                    "feeder_roles": [self.roles(*lh) for lh in f.feeders],
                    "ablation_feeders": [list(lh) for lh in f.ablation_feeders],
                    "induction_drop": list(f.induction_drop),
                }
                for f in self.circuit
            ],
        }

    def summary(self) -> str:
        """A few plain sentences: the induction heads, the circuit, the in-context score."""
        ind = ", ".join(f"L{l}H{h}" for l, h in self.induction_heads) or "none"
        best = divmod(int(self.scores["induction"].argmax()), self.n_heads)
        lines = [
            f"{self.model}: induction heads: {ind} (highest induction score "
            f"{float(self.scores['induction'].max()):.3f} at L{best[0]}H{best[1]}; "
            f"threshold {self.thresholds.induction}).",
            f"In-context score (loss late - early on {self.layout}, n={self.seq_len}): "
            f"{self.in_context_score:+.3f} nats "
            f"({self.loss_early:.3f} -> {self.loss_late:.3f}).",
        ]
        lines += ["Circuit: " + f.describe() for f in self.circuit]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        import html

        from icl_circuits.report import table_html

        return (
            f"<div><pre>{html.escape(self.summary())}</pre>"
            + table_html(self.to_dataframe(), max_rows=12)
            + "<p><i>.plot() for the heatmaps, .attention_html(model) for attention views</i></p></div>"
        )


_TITLES = {
    "induction": "Induction score",
    "prefix_matching": "Prefix-matching score",
    "previous_token": "Previous-token score",
    "duplicate_token": "Duplicate-token score",
    "copying": "Copying (OV eigenvalues)",
    "ablation": "Ablation effect on the in-context gain (nats; < 0: helps)",
}


def token_labels(model: Any, ids: torch.Tensor) -> list[str]:
    """``ids [pos]`` as strings: decoded pieces with a tokenizer, ``"<id>"`` without one."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{int(i)}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


@torch.no_grad()
def scan_heads(
    model: Any,
    *,
    seq_len: int = 20,
    batch: int = 16,
    seed: int = 0,
    ablation: bool = True,
    prefix_repeats: int = 4,
    copying_tokens: int | None = None,
    thresholds: RoleThresholds | None = None,
    progress: bool = True,
    ablation_batch: int | None = None,
    log: Callable[[str], None] | None = None,
    matmul_precision: str | None = "medium",
) -> HeadScan:
    """Scan every head of ``model`` (a TransformerBridge in compatibility mode).

    Args:
        seq_len: ``n``, the length of the random segment ``r`` in ``[BOS?, r, r]`` (``o + 2n <= n_ctx``,
            ``o = 1`` with a BOS).
        batch: sequences per measurement.
        seed: seeds the token sampler (``torch.Generator``); same seed, same sequences.
        ablation: run the mean-ablation sweep (negative effect = the head helps; see the module doc).
        prefix_repeats: copies of ``r`` for the prefix-matching score (>= 2); its segment is shortened
            to ``(n_ctx - 1) // prefix_repeats`` when ``seq_len`` copies would not fit the context.
        copying_tokens: sample this many ordinary tokens for the copying score (default: all of them).
        thresholds: the role cuts (default :class:`RoleThresholds`).
        progress: tqdm bar over the ablation sweep.
        ablation_batch: sweep the first this many of the ``batch`` sequences (default: the model kind's
            ``DEFAULTS[kind]["head-scan"]["ablation_batch"]`` of :mod:`icl_circuits.tasks.defaults`, capped
            at ``batch``; ``None`` there = all). The sweep costs ~``ablation_batch`` forwards of the upper
            layers per head, the attention scores two forwards in all, so a real model sweeps fewer
            sequences; the README's "Measured speed" section states the price in agreement with a full sweep.
        log: called with one line per finished stage (its wall-clock time), e.g. ``print``.
        matmul_precision: torch's float32 matmul precision during the sweep on a CPU model (ignored on
            other devices, where ``"medium"`` may mean plain bfloat16): ``"medium"`` measured 1.6-1.9x faster
            on SmolLM2 (AVX512-BF16) with effects within 6e-6 nats of ``"highest"`` (README "Measured
            speed"); ``None`` keeps torch's setting.
    """
    if not isinstance(seq_len, int) or not isinstance(batch, int) or batch < 1 or seq_len < 2:
        raise InputError(f"seq_len must be an int >= 2 and batch an int >= 1; got seq_len={seq_len!r}, batch={batch!r}")
    if prefix_repeats < 2:
        raise InputError(f"prefix_repeats must be >= 2 (copies of r), got {prefix_repeats}")
    if ablation_batch is not None and not (isinstance(ablation_batch, int) and 1 <= ablation_batch <= batch):
        raise InputError(f"ablation_batch must be an int in 1..batch={batch}, got {ablation_batch!r}")
    default = run_default(model, "head-scan", "ablation_batch", ablation_batch)
    n_ablate = batch if default is None else min(int(default), batch)
    timings: dict[str, float] = {}
    clock = [time.perf_counter()]

    def stage(name: str) -> None:
        now = time.perf_counter()
        timings[name] = now - clock[0]
        clock[0] = now
        if log is not None:
            log(f"  {name}: {timings[name]:.1f} s")

    n_ctx = int(model.cfg.n_ctx)
    gen = generator(seed)
    tokens = hd.repeated_random_tokens(model, batch, seq_len, gen)
    prefix_n = min(seq_len, (n_ctx - 1) // prefix_repeats)
    if prefix_n < 2:
        raise InputError(f"context {n_ctx} is too short for {prefix_repeats} copies of a 2-token segment")
    prefix_tokens = hd.repeated_random_tokens(model, batch, prefix_n, gen, repeats=prefix_repeats)

    scores, logits = hd.attention_scores(model, tokens, seq_len, prefix_tokens, prefix_repeats)
    early, late = hd.in_context_losses(logits, tokens.to(logits.device), seq_len)
    del logits
    stage(f"attention scores ({batch} sequences)")
    scores["copying"] = comp.copying_scores(model, n_tokens=copying_tokens, generator=gen if copying_tokens else None)
    stage("copying (OV eigenvalues)")
    sweep = None
    if ablation:
        on_cpu = str(getattr(model.cfg, "device", None) or "cpu").startswith("cpu")
        ablate = tokens[:n_ablate]
        sweep = mean_ablation_sweep(
            model, ablate, InContextGain(ablate, seq_len), pattern_score=lambda p: hd.induction_stripe(p, seq_len),
            progress=progress, matmul_precision=matmul_precision if on_cpu else None,
        )  # fmt: skip
        scores["ablation"] = sweep.effect
        stage(f"mean-ablation sweep ({int(model.cfg.n_layers) * int(model.cfg.n_heads)} heads x {n_ablate} sequences)")
    compo = comp.all_composition_scores(model)
    d_model, d_head = int(model.cfg.d_model), int(model.cfg.d_head)
    baselines = {m: comp.composition_baseline(d_model, d_head, m, generator=gen) for m in comp.MODES}
    stage("composition (Q, K, V) and baselines")
    return HeadScan(
        model=model_info(model).spec,
        seq_len=seq_len,
        batch=batch,
        seed=seed,
        prefix_repeats=prefix_repeats,
        prefix_seq_len=prefix_n,
        scores=scores,
        composition=compo,
        baselines=baselines,
        loss_early=float(early.mean()),
        loss_late=float(late.mean()),
        induction_change=None if sweep is None else sweep.pattern_change,
        tokens=tokens,
        thresholds=thresholds or RoleThresholds(),
        ablation_batch=n_ablate if ablation else None,
        timings=timings,
    )
