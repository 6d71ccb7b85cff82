"""Transplant test: does the demos' fast-weight contribution, as one vector, do the task without demos?

Function vectors (Todd et al. 2024), here built from the exact demo part of :mod:`icl_circuits.fast_weights.decompose`:

1. **Split the inputs.** The task's inputs with a fixed answer are split at random (seeded) into two
   folds. For fold ``F`` the *extraction* prompts are ``shots``-shot prompts whose query is in ``F``;
   the *test* prompts are the zero-shot prompts (``<bos> x ->``) of the other fold: held-out queries.
2. **Extract.** ``v = sum over heads of mean_b c_D`` (:func:`~icl_circuits.fast_weights.decompose.task_vector`),
   at the answer position of the extraction prompts; heads: the given ones, or (``"auto"``) the
   ``n_heads`` heads whose demo part gives the answer the largest logit-lens logit on these prompts.
3. **Transplant.** ``v`` is added (scale 1, no tuning) to the residual stream at the last position of
   zero-shot prompts, at ``blocks.{L}.hook_resid_pre`` (``L = n_layers``: ``blocks.{n_layers-1}.hook_resid_post``).
   ``L`` is chosen per fold on the zero-shot prompts of the *extraction* fold (validation), then the
   accuracy is measured on the test fold at that ``L``. Every input is tested exactly once (two folds).
4. **Controls** at the same ``L``: ``n_random`` Gaussian vectors of norm ``|v|`` (mean accuracy), and
   the vector extracted in the same way from the same prompts with the demo labels permuted among the
   demos (a derangement: every demo's label is another demo's).

5. **Fast-weight transplant.** The same demos' keys and values, per head (:class:`DemoMemory`), as a
   task-level *linear fast weight* (the first-order dual form of softmax attention; Schlag et al. 2021,
   Dai et al. 2023). For extraction prompt ``p`` with demo positions ``D_p`` (``n_p`` of them), keys
   ``k~_s`` and values ``v_s`` (``[d_head]``, keys after rotary where the model has it; only the positions the
   query could see, so a sliding window is respected), and the demo
   attention mass at its query ``a_p = sum_{s in D_p} A[q, s]``, linearising ``softmax_s(q~.k~_s / sqrt(d))``
   around the mean key gives the head's demo part ``~ a_p (v_bar_p + dW_p q~)`` with::

       dW_p = 1 / (n_p sqrt(d)) sum_{s in D_p} v_s (k~_s - k_bar_p)^T          [d_head, d_head]
       W = mean_p a_p dW_p,   b = mean_p a_p v_bar_p                            (one per head)

   With RoPE, ``q~`` of a zero-shot query is its query rotated to ``T_p``, the extraction prompt's query position
   (``R(T_p) q``), so ``q~ . k~_s`` sees the demo keys at the relative offsets the model saw; ``W`` then holds
   ``mean_p a_p dW_p R(T_p)`` and acts on the un-rotated query (``R = I`` without rotary).
   The transplant adds ``b + W_r q~`` to each head's ``hook_z`` at the last position of the zero-shot
   prompts, every head at once, each with its own ``q~`` from the same forward (so later layers see the
   earlier additions); ``W_r`` is the rank-``r`` truncation (SVD), ``r = 0`` leaves only the bias ``b``.
   The extraction demos are drawn from the extraction fold only, so no test pair is ever shown.
   Controls: ``(W, b)`` from the shuffled-label prompts, and ``n_random`` draws with ``W``'s singular
   values on random singular vectors and a random ``b`` of ``|b|``. Reference: the exact softmax
   memory, ``mean_p a_p sum_{s in D_p} softmax_s(q~.k~_s / sqrt(d)) v_s`` (no linearisation).

Accuracy is argmax accuracy of the answer's first token at the last position.

Cost per fold: one decomposition forward of the extraction prompts (twice: clean and shuffled), then
``(n_layers + 1) * (2 + n_random)`` forwards of the zero-shot prompts for the sweep, and
``n_ranks + n_layers + 3 + n_random`` for the fast-weight transplant.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl_circuits.errors import InputError, TaskError
from icl_circuits.fast_weights import decompose as fw
from icl_circuits.models import attention
from icl_circuits.results import Result, renamed_kwargs
from icl_circuits.shapes import expand_kv
from icl_circuits.tasks.registry import Task
from icl_circuits.tasks.roles import render_examples


def hook_name(model: Any, layer: int) -> str:
    """Where a vector is added before block ``layer`` (``layer == n_layers``: after the last block)."""
    n = int(model.cfg.n_layers)
    if not 0 <= layer <= n:
        raise InputError(f"layer must be in 0..{n}, got {layer}")
    return f"blocks.{layer}.hook_resid_pre" if layer < n else f"blocks.{n - 1}.hook_resid_post"


@torch.no_grad()
def logits_with_vector(
    model: Any, tokens: torch.Tensor, last_positions: torch.Tensor, vector: torch.Tensor | None, layer: int
) -> torch.Tensor:
    """``[batch, d_vocab]`` logits at ``last_positions`` with ``vector [d_model]`` added to the residual
    stream at each prompt's last position before block ``layer`` (``None``: no vector)."""
    device = getattr(model.cfg, "device", None) or "cpu"
    rows = torch.arange(tokens.shape[0])
    if vector is None:
        return model(tokens.to(device))[rows, last_positions].float().cpu()
    if vector.shape != (int(model.cfg.d_model),):
        raise InputError(f"vector must be [{model.cfg.d_model}], got {tuple(vector.shape)}")

    def add(resid: torch.Tensor, hook: Any) -> torch.Tensor:
        out = resid.clone()
        out[rows, last_positions] += vector.to(out.device, out.dtype)
        return out

    with model.hooks(fwd_hooks=[(hook_name(model, layer), add)]):
        logits = model(tokens.to(device))
    return logits[rows, last_positions].float().cpu()


@dataclass(frozen=True)
class DemoMemory:
    """The demos' keys and values per layer and head, read from extraction prompts (step 5 of the module doc).

    ``keys[l]``, ``values[l] [prompt, pos, head, d_head]`` (keys as they enter the scores: after rotary, at
    their own positions), ``demo [prompt, pos]`` (1.0 on demo positions), ``demo_attention[l] [prompt, head]``
    (``a_p``, the attention mass the query puts on the demos), ``scale`` (the score divisor, ``sqrt(d_head)``).
    ``query_rotation[l] [prompt, d_head, d_head]``: with RoPE, ``R(T_p)``, the rotation of each extraction
    prompt's query position ``T_p``; a reading query ``q`` (before rotation) is rotated by it, so it meets the
    demo keys at the relative offsets the model saw (``None``: no rotary embedding, ``q~ = q``).
    ``visible[l] [prompt, head, pos]``: 1.0 where the extraction query could attend (a sliding window hides
    the rest; ``None``: everywhere).
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    demo: torch.Tensor
    demo_attention: tuple[torch.Tensor, ...]
    scale: float
    query_rotation: tuple[torch.Tensor, ...] | None = None
    visible: tuple[torch.Tensor, ...] | None = None

    def mask(self, layer: int) -> torch.Tensor:
        """``[prompt, head, pos]``: 1.0 on the demo positions the query of each prompt could attend to."""
        m = self.demo[:, None, :].expand(-1, self.keys[layer].shape[2], -1)
        return m * self.visible[layer] if self.visible is not None else m

    def rotate_query(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """``q [batch, head, d_head]`` (before rotation) -> ``[batch, prompt, head, d_head]``, as each prompt's
        query position ``T_p`` would enter the scores: ``R(T_p) q``."""
        q = q.float()
        if self.query_rotation is None:
            return q[:, None].expand(-1, self.demo.shape[0], -1, -1)
        return torch.einsum("pef,bhf->bphe", self.query_rotation[layer], q)


def reading_query_hook(model: Any, layer: int) -> str:
    """The hook holding the query before rotation: ``hook_q_normed`` on QK-norm models, else ``hook_q``."""
    name = f"blocks.{layer}.attn.hook_q_normed"
    return name if name in model.hook_dict else f"blocks.{layer}.attn.hook_q"


@torch.no_grad()
def demo_memory(model: Any, tokens: torch.Tensor, roles: Any) -> DemoMemory:
    """Read every layer's demo keys, values, visibility and demo attention mass from ``tokens [prompt, pos]``.

    Raises:
        ICLCircuitsError: scores that are not ``q~.k~ / scale`` (e.g. attention soft-capping): a softmax
            memory of these keys would not be what the model computes.
    """
    n_layers, n_heads, d_head = int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head)
    scale = fw.score_scale(model)
    names = {n for l in range(n_layers) for n in attention.hook_names(l)}
    names |= {f"blocks.{l}.attn.{x}" for l in range(n_layers) for x in ("hook_v", "hook_pattern", "hook_attn_scores")}
    device = getattr(model.cfg, "device", None) or "cpu"
    _, cache = model.run_with_cache(tokens.to(device), names_filter=lambda n: n in names)
    demo = (roles.demo_index >= 0).float().cpu()
    rows, last = torch.arange(tokens.shape[0]), roles.last_positions.cpu()
    keys, values, mass, rots, vis = [], [], [], [], []
    for l in range(n_layers):
        qe, ke = attention.score_vectors(model, cache, l)
        k = expand_kv(ke, n_heads, dim=2).float().cpu()
        q = expand_kv(qe, n_heads, dim=2)[rows, last].float().cpu()  # [prompt, head, d_head]
        scores = cache[f"blocks.{l}.attn.hook_attn_scores"][rows, :, last].float().cpu()  # [prompt, head, pos]
        fw.check_dot_product_scores(l, torch.einsum("phe,pshe->phs", q, k) / scale, scores, scale)
        keys.append(k)
        values.append(expand_kv(cache[f"blocks.{l}.attn.hook_v"], n_heads, dim=2).float().cpu())
        vis.append(torch.isfinite(scores).float())
        A = cache[f"blocks.{l}.attn.hook_pattern"][rows, :, last].float().cpu()  # [prompt, head, pos]
        mass.append((A * demo[:, None]).sum(-1))
        tables = attention.rotary_tables(cache, l) if attention.is_rotary(model) else None
        if tables is not None:
            cos, sin = (t.expand(len(rows), -1, -1) for t in tables)  # the bridge's tables may be [1, pos, r]
            rots.append(attention.rotation_matrix(cos[rows, last].float().cpu(), sin[rows, last].float().cpu(), d_head))
    return DemoMemory(tuple(keys), tuple(values), demo, tuple(mass), scale,
                      tuple(rots) if len(rots) == n_layers else None, tuple(vis))  # fmt: skip


def linear_fast_weight(mem: DemoMemory) -> tuple[torch.Tensor, torch.Tensor]:
    """The task-level linear fast weight ``W [layer, head, d_head, d_head]`` and bias ``b [layer, head,
    d_head]``: ``W = mean_p a_p dW_p R(T_p)``, ``b = mean_p a_p v_bar_p`` (module doc, step 5; ``R = I``
    without rotary), acting on the reading query before rotation."""
    Ws, bs = [], []
    for l, (K, V, a) in enumerate(zip(mem.keys, mem.values, mem.demo_attention)):
        m = mem.mask(l).transpose(1, 2)[..., None]  # [prompt, pos, head, 1]
        n = m.sum(1).clamp_min(1.0)  # [prompt, head, 1]
        k_bar, v_bar = (K * m).sum(1) / n, (V * m).sum(1) / n  # [prompt, head, d_head]
        # V * m masks the non-demo (and invisible) positions out of the sum
        dW = torch.einsum("pshe,pshf->phef", V * m, K - k_bar[:, None]) / (n[..., None] * mem.scale)
        if mem.query_rotation is not None:
            dW = torch.einsum("phef,pfg->pheg", dW, mem.query_rotation[l])
        Ws.append((a[..., None, None] * dW).mean(0))
        bs.append((a[..., None] * v_bar).mean(0))
    return torch.stack(Ws), torch.stack(bs)


def low_rank(W: torch.Tensor, rank: int) -> torch.Tensor:
    """``W [..., d, d]`` truncated to its top ``rank`` singular directions (``rank = 0``: zeros)."""
    if rank < 0:
        raise InputError(f"rank must be >= 0, got {rank}")
    U, S, Vh = torch.linalg.svd(W)
    r = min(rank, S.shape[-1])
    return (U[..., :r] * S[..., None, :r]) @ Vh[..., :r, :]


def random_fast_weight(W: torch.Tensor, b: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The control: ``W``'s singular values on random orthonormal singular vectors, and ``b``'s norms in
    random directions."""
    S = torch.linalg.svdvals(W)
    U = torch.linalg.qr(torch.randn(W.shape, generator=gen).to(W)).Q  # cpu generator, then W's device
    V = torch.linalg.qr(torch.randn(W.shape, generator=gen).to(W)).Q  # cpu generator, then W's device
    r = torch.randn(b.shape, generator=gen).to(b)  # cpu generator, then b's device
    return (U * S[..., None, :]) @ V.mT, r / r.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True)


@torch.no_grad()
def _logits_adding_to_z(
    model: Any, tokens: torch.Tensor, last_positions: torch.Tensor,
    add: Callable[[int, torch.Tensor], torch.Tensor | None],
) -> torch.Tensor:  # fmt: skip
    """``[batch, d_vocab]`` logits at ``last_positions`` with ``add(layer, q [batch, head, d_head])``
    (``[batch, head, d_head]`` or ``None``) added to ``hook_z`` there, layer by layer in one forward
    (``q``: the query before rotation, :func:`reading_query_hook`)."""
    device = getattr(model.cfg, "device", None) or "cpu"
    rows, last = torch.arange(tokens.shape[0]), last_positions.cpu()
    seen: dict[int, torch.Tensor] = {}
    hooks: list[tuple[str, Any]] = []
    for l in range(int(model.cfg.n_layers)):

        qname = reading_query_hook(model, l)

        def read_q(q: torch.Tensor, hook: Any, l: int = l, normed: bool = qname.endswith("normed")) -> None:
            seen[l] = (q.transpose(1, 2) if normed else q)[rows, last].float().cpu()  # QK-norm hooks: [b, h, p, d]

        def write_z(z: torch.Tensor, hook: Any, l: int = l) -> torch.Tensor:
            extra = add(l, seen.pop(l))
            if extra is None:
                return z
            out = z.clone()
            out[rows, last] += extra.to(out.device, out.dtype)
            return out

        hooks += [(qname, read_q), (f"blocks.{l}.attn.hook_z", write_z)]
    with model.hooks(fwd_hooks=hooks):
        logits = model(tokens.to(device))
    return logits[rows, last].float().cpu()


def logits_with_fast_weight(
    model: Any, tokens: torch.Tensor, last_positions: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
    layers: Sequence[int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """``[batch, d_vocab]`` logits with ``b + W q~`` added to every head's ``hook_z`` at ``last_positions``
    (``W [layer, head, d_head, d_head]``, ``b [layer, head, d_head]``; ``layers``: only these, default all)."""
    shape = (int(model.cfg.n_layers), int(model.cfg.n_heads), int(model.cfg.d_head))
    if tuple(b.shape) != shape or tuple(W.shape) != (*shape, shape[-1]):
        raise InputError(f"W must be {[*shape, shape[-1]]} and b {list(shape)}, got {list(W.shape)}, {list(b.shape)}")
    keep = set(range(shape[0]) if layers is None else layers)
    return _logits_adding_to_z(
        model, tokens, last_positions,
        lambda l, q: b[l] + torch.einsum("hef,bhf->bhe", W[l], q) if l in keep else None,
    )  # fmt: skip


def memory_read(mem: DemoMemory, layer: int, q: torch.Tensor) -> torch.Tensor:
    """The exact softmax memory read by queries ``q [batch, head, d_head]`` (before rotation) at ``layer``:
    ``mean_p a_p sum_{s in D_p} softmax_{s in D_p}(R(T_p) q . k~_s / scale) v_s`` -> ``[batch, head, d_head]``
    (``D_p``: the demo positions the extraction query could see).

    For one prompt read with its own query this is exactly the head's demo part before ``W_O``
    (``A[q, s] = a_p softmax_{s in D_p}(...)`` on demo positions), rotary embeddings included."""
    scores = torch.einsum("bphe,pshe->bphs", mem.rotate_query(layer, q), mem.keys[layer]) / mem.scale
    w = scores.masked_fill(mem.mask(layer)[None] == 0, torch.finfo(torch.float32).min).softmax(-1)
    read = torch.einsum("bphs,pshe->bphe", w, mem.values[layer])
    return (read * mem.demo_attention[layer][None, ..., None]).mean(1)


def logits_with_memory(model: Any, tokens: torch.Tensor, last_positions: torch.Tensor, mem: DemoMemory) -> torch.Tensor:
    """``[batch, d_vocab]`` logits with :func:`memory_read` added to every head's ``hook_z`` at ``last_positions``."""
    return _logits_adding_to_z(model, tokens, last_positions, lambda l, q: memory_read(mem, l, q))


@dataclass(frozen=True)
class TransplantResult(Result):
    """Zero-shot accuracy on held-out queries with the task vector and its controls.

    ``sweep``: one row per fold and layer with validation and test accuracies (vector, random,
    shuffled); the headline numbers use each fold's layer chosen on validation. ``fast_weight_*``: the
    fast-weight transplant (module doc, step 5) at full rank and its controls; ``memory_acc``: the exact
    softmax memory; ``by_rank`` / ``by_layer``: ``(rank or layer, accuracy)`` with the fast weight
    truncated to that rank / of that layer's heads only. All on the same held-out queries.
    """

    model: str
    task: str
    shots: int
    zero_shot_acc: float
    with_vector_acc: float
    random_control_acc: float
    shuffled_control_acc: float
    n_test: int
    layers: tuple[int, ...]
    heads: tuple[tuple[tuple[int, int], ...], ...]
    vector_norm: tuple[float, ...]
    sweep: tuple[dict[str, Any], ...]
    n_random: int
    seed: int
    fast_weight_acc: float
    fast_weight_random_acc: float
    fast_weight_shuffled_acc: float
    memory_acc: float
    by_rank: tuple[tuple[int, float], ...]
    by_layer: tuple[tuple[int, float], ...]

    title = "Transplant"

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``transplant`` block."""
        return {
            "zero_shot_acc": self.zero_shot_acc, "with_vector_acc": self.with_vector_acc,
            "random_control_acc": self.random_control_acc, "shuffled_control_acc": self.shuffled_control_acc,
            "n_test": self.n_test, "layer_per_fold": list(self.layers),
            "heads_per_fold": [[list(h) for h in hs] for hs in self.heads],
            "vector_norm_per_fold": list(self.vector_norm), "n_random": self.n_random, "seed": self.seed,
            "sweep": [dict(r) for r in self.sweep],
            "fast_weight": {
                "with_fast_weight_acc": self.fast_weight_acc, "random_control_acc": self.fast_weight_random_acc,
                "shuffled_control_acc": self.fast_weight_shuffled_acc, "softmax_memory_acc": self.memory_acc,
                "acc_by_rank": {str(r): a for r, a in self.by_rank},
                "acc_by_layer": {str(l): a for l, a in self.by_layer},
            },
        }  # fmt: skip

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        import pandas as pd

        return pd.DataFrame(list(self.sweep))

    def figures(self) -> list[Any]:  # list[plotly Figure]
        """[vector accuracies, test accuracy by layer, fast-weight accuracies, fast weight by rank and layer].
        Pure: returns the figures."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        names = ["zero-shot", "with task vector", "random vector", "shuffled-label vector"]
        vals = [self.zero_shot_acc, self.with_vector_acc, self.random_control_acc, self.shuffled_control_acc]
        bars = go.Figure(go.Bar(x=names, y=vals, text=[f"{v:.2f}" for v in vals], textposition="outside"))
        title = f"Transplant on held-out zero-shot queries ({self.task}, n={self.n_test}, layers {list(self.layers)})"
        bars.update_layout(title=title, yaxis_title="accuracy", yaxis_range=[0, 1.1])
        df = self.to_dataframe()
        sweep = go.Figure()
        for col, name in (("test_vector", "task vector"), ("test_random", "random"), ("test_shuffled", "shuffled")):
            mean = df.groupby("layer")[col].mean()
            sweep.add_trace(go.Scatter(x=list(mean.index), y=list(mean.values), mode="lines+markers", name=name))
        sweep.add_hline(y=self.zero_shot_acc, line_dash="dash", annotation_text="zero-shot")
        sweep.update_layout(title="Test accuracy by layer of insertion (mean over folds; for reading only: "
                                  "the headline layer is chosen on validation)", xaxis_title="layer (resid_pre)",
                            xaxis_dtick=1,
                            yaxis_title="accuracy", yaxis_range=[0, 1.05])  # fmt: skip
        names = ["zero-shot", "with fast weight", "random (same spectrum)", "shuffled-label", "softmax memory"]
        vals = [self.zero_shot_acc, self.fast_weight_acc, self.fast_weight_random_acc, self.fast_weight_shuffled_acc,
                self.memory_acc]  # fmt: skip
        fw_bars = go.Figure(go.Bar(x=names, y=vals, text=[f"{v:.2f}" for v in vals], textposition="outside"))
        fw_bars.update_layout(title=f"Fast-weight transplant (b + W q~ in every head) on the same {self.n_test} "
                                    "held-out queries", yaxis_title="accuracy", yaxis_range=[0, 1.1])  # fmt: skip
        curve = make_subplots(rows=1, cols=2, subplot_titles=("every head, W truncated to rank r (0: bias only)",
                                                             "full rank, one layer's heads at a time"))  # fmt: skip
        curve.add_trace(go.Scatter(x=[str(r) for r, _ in self.by_rank], y=[a for _, a in self.by_rank],
                                   mode="lines+markers", name="by rank"), row=1, col=1)  # fmt: skip
        curve.add_trace(go.Bar(x=[f"L{l}" for l, _ in self.by_layer], y=[a for _, a in self.by_layer],
                               name="by layer"), row=1, col=2)  # fmt: skip
        curve.add_hline(y=self.zero_shot_acc, line_dash="dash", annotation_text="zero-shot")
        curve.update_xaxes(title_text="rank r", type="category", row=1, col=1)
        curve.update_xaxes(title_text="layer", type="category", row=1, col=2)
        curve.update_yaxes(title_text="accuracy", range=[0, 1.05])
        curve.update_layout(title="Fast-weight transplant by rank and by layer", showlegend=False)
        return [bars, sweep, fw_bars, curve]

    def _repr_html_(self) -> str:
        head = (f"<b>Transplant</b> {self.task}: zero-shot {self.zero_shot_acc:.3f}, with vector "
                f"{self.with_vector_acc:.3f}, random {self.random_control_acc:.3f}, shuffled "
                f"{self.shuffled_control_acc:.3f} (n={self.n_test}, layers {list(self.layers)}); fast weight "
                f"{self.fast_weight_acc:.3f}, random {self.fast_weight_random_acc:.3f}, shuffled "
                f"{self.fast_weight_shuffled_acc:.3f}, softmax memory {self.memory_acc:.3f}")  # fmt: skip
        return head + self.to_dataframe().to_html(index=False, float_format="%.3f")


def _fixed_inputs(task: Any) -> list[str]:
    """Inputs of ``task`` that have a fixed answer (``task.lookup``), in a stable order."""
    from icl_circuits.tasks import corpus

    pool = [p.input for p in task.pairs] if hasattr(task, "pairs") else list(corpus.LETTERS)
    inputs = [x for x in pool if task.lookup(x) is not None]
    if len(inputs) < 4:
        raise TaskError(
            f"task {task.name!r} has no fixed input -> output map ({len(inputs)} inputs with one), so a zero-shot "
            "transplant cannot be scored; use a task such as fixture-recorded0, fixture-rule-shift2 or a task file"
        )
    return inputs


def derange_labels(example: Any, rng: np.random.Generator) -> Any:
    """The example with its demo labels permuted so that no demo keeps its own label (needs >= 2 demos)."""
    from icl_circuits.tasks.registry import FewShot, Pair

    n = example.n_shots
    if n < 2:
        raise TaskError("shuffling labels needs at least 2 demos")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            break
    demos = tuple(Pair(d.input, example.demos[int(j)].output) for d, j in zip(example.demos, perm))
    return FewShot(demos, example.query, example.flipped)


def _extraction_examples(task: Any, shots: int, fold: Sequence[str], n: int, rng: np.random.Generator) -> list[Any]:
    """``n`` clean ``shots``-shot examples whose demos and query are distinct inputs of ``fold``."""
    from icl_circuits.tasks.registry import FewShot, Pair

    if len(fold) < shots + 1:
        raise TaskError(f"task {task.name!r}: a fold has {len(fold)} inputs with a fixed answer, {shots}-shot "
                        f"extraction prompts need {shots + 1} (use fewer shots)")  # fmt: skip
    out = []
    for _ in range(n):
        xs = [fold[int(i)] for i in rng.permutation(len(fold))[: shots + 1]]
        pairs = [Pair(x, str(task.lookup(x))) for x in xs]
        out.append(FewShot(tuple(pairs[:-1]), pairs[-1]))
    return out


@renamed_kwargs(n_prompts="n")
def transplant_test(
    model: Any,
    task: str | Task,
    shots: int,
    *,
    heads: str | Sequence[tuple[int, int]] = "auto",
    n_heads: int = 4,
    n: int = 64,
    n_random: int = 5,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    ranks: Sequence[int] = (0, 1, 2, 4),
) -> TransplantResult:
    """Run the transplant test (module doc) for ``task`` (a name or a Task) with ``shots``-shot extraction on ``n``
    prompts per fold.

    Raises:
        TaskError: a task without a fixed input -> output map, ``shots < 2``, or folds smaller than ``shots + 1``.
        InputError: bad heads or layers.
    """
    from icl_circuits.models import model_info
    from icl_circuits.tasks.prompts import check_task
    from icl_circuits.tasks.registry import FewShot, Pair, get_task

    task = get_task(task, model)
    if shots < 2:
        raise TaskError(f"the shuffled-label control needs shots >= 2, got {shots}")
    checked = check_task(model, task)
    task = checked.task
    inputs = _fixed_inputs(task)
    sweep_layers = list(range(int(model.cfg.n_layers) + 1)) if layers is None else [int(x) for x in layers]
    for x in sweep_layers:
        hook_name(model, x)
    rng = np.random.default_rng(seed)
    order = [inputs[int(i)] for i in rng.permutation(len(inputs))]
    folds = [order[: len(order) // 2], order[len(order) // 2 :]]
    gen = torch.Generator().manual_seed(seed)
    zero = {x: FewShot((), Pair(x, str(task.lookup(x)))) for x in inputs}
    rows: list[dict[str, Any]] = []
    n_layers, full = int(model.cfg.n_layers), int(model.cfg.d_head)
    rank_list = sorted({min(int(r), full) for r in ranks} | {full})
    totals = {k: 0.0 for k in ("zero", "vector", "random", "shuffled", "fw", "fw_random", "fw_shuffled", "memory")}
    totals |= {f"rank{r}": 0.0 for r in rank_list} | {f"layer{l}": 0.0 for l in range(n_layers)}
    chosen_layers, chosen_heads, norms = [], [], []
    for f, (train_keys, test_keys) in enumerate(((folds[0], folds[1]), (folds[1], folds[0]))):
        examples = _extraction_examples(task, shots, train_keys, n, rng)
        shuffled = [derange_labels(ex, rng) for ex in examples]
        tok, roles, ans, _ = render_examples(model, checked, examples)
        tok_s, roles_s, _, _ = render_examples(model, checked, shuffled)
        if heads == "auto":
            dec = fw.decompose(model, tok, roles)
            hs = fw.summarize(model, dec, ans).best(n_heads)
        else:
            hs = fw.parse_heads(heads, model)
            dec = fw.decompose(model, tok, roles, hs)
        vec = fw.task_vector(dec, hs)
        vec_s = fw.task_vector(fw.decompose(model, tok_s, roles_s, hs), hs)
        randoms = torch.randn(n_random, vec.shape[0], generator=gen).to(vec)  # cpu generator, then vec's device
        randoms = randoms / randoms.norm(dim=-1, keepdim=True) * vec.norm()
        sets = {}
        for split, keys in (("val", train_keys), ("test", test_keys)):
            t, r, a, _ = render_examples(model, checked, [zero[x] for x in keys])
            sets[split] = (t, r.last_positions, a)
        base = {s: _acc(logits_with_vector(model, t, lp, None, 0), a) for s, (t, lp, a) in sets.items()}
        per_layer = []
        for L in sweep_layers:
            row: dict[str, Any] = {"fold": f, "layer": L}
            for s, (t, lp, a) in sets.items():
                row[f"{s}_vector"] = _acc(logits_with_vector(model, t, lp, vec, L), a)
                row[f"{s}_shuffled"] = _acc(logits_with_vector(model, t, lp, vec_s, L), a)
                row[f"{s}_random"] = float(np.mean([_acc(logits_with_vector(model, t, lp, r, L), a) for r in randoms]))
                row[f"{s}_zero_shot"] = base[s]
            per_layer.append(row)
        best = max(per_layer, key=lambda r: (r["val_vector"], -r["layer"]))
        n_test = len(test_keys)
        totals["zero"] += base["test"] * n_test
        totals["vector"] += best["test_vector"] * n_test
        totals["random"] += best["test_random"] * n_test
        totals["shuffled"] += best["test_shuffled"] * n_test
        t, lp, a = sets["test"]
        mem = demo_memory(model, tok, roles)
        W, b = linear_fast_weight(mem)
        W_s, b_s = linear_fast_weight(demo_memory(model, tok_s, roles_s))
        controls = [random_fast_weight(W, b, gen) for _ in range(n_random)]
        acc = {"fw": _acc(logits_with_fast_weight(model, t, lp, W, b), a),
               "fw_shuffled": _acc(logits_with_fast_weight(model, t, lp, W_s, b_s), a),
               "fw_random": float(np.mean([_acc(logits_with_fast_weight(model, t, lp, *c), a) for c in controls])),
               "memory": _acc(logits_with_memory(model, t, lp, mem), a)}  # fmt: skip
        acc |= {f"rank{r}": _acc(logits_with_fast_weight(model, t, lp, low_rank(W, r), b), a) for r in rank_list[:-1]}
        acc[f"rank{full}"] = acc["fw"]  # full rank is W itself
        acc |= {f"layer{l}": _acc(logits_with_fast_weight(model, t, lp, W, b, [l]), a) for l in range(n_layers)}
        for k, v in acc.items():
            totals[k] += v * n_test
        rows += per_layer
        chosen_layers.append(int(best["layer"]))
        chosen_heads.append(tuple(hs))
        norms.append(float(vec.norm()))
    n = len(inputs)
    return TransplantResult(
        model_info(model).spec, task.name, shots, totals["zero"] / n, totals["vector"] / n, totals["random"] / n,
        totals["shuffled"] / n, n, tuple(chosen_layers), tuple(chosen_heads), tuple(norms), tuple(rows), n_random, seed,
        totals["fw"] / n, totals["fw_random"] / n, totals["fw_shuffled"] / n, totals["memory"] / n,
        tuple((r, totals[f"rank{r}"] / n) for r in rank_list),
        tuple((l, totals[f"layer{l}"] / n) for l in range(n_layers)),
    )  # fmt: skip


def _acc(logits: torch.Tensor, answers: torch.Tensor) -> float:
    return float((logits.argmax(-1) == answers).float().mean())
