"""Transplant test: does the demos' fast-weight contribution, as one vector, do the task without demos?

Function vectors (Todd et al. 2024), here built from the exact demo part of :mod:`icl_circuits.fast_weights`:

1. **Split the inputs.** The task's inputs with a fixed answer are split at random (seeded) into two
   folds. For fold ``F`` the *extraction* prompts are ``shots``-shot prompts whose query is in ``F``;
   the *test* prompts are the zero-shot prompts (``<bos> x ->``) of the other fold: held-out queries.
2. **Extract.** ``v = sum over heads of mean_b c_D`` (:func:`~icl_circuits.fast_weights.task_vector`),
   at the answer position of the extraction prompts; heads: the given ones, or (``"auto"``) the
   ``n_heads`` heads whose demo part gives the answer the largest logit-lens logit on these prompts.
3. **Transplant.** ``v`` is added (scale 1, no tuning) to the residual stream at the last position of
   zero-shot prompts, at ``blocks.{L}.hook_resid_pre`` (``L = n_layers``: ``blocks.{n_layers-1}.hook_resid_post``).
   ``L`` is chosen per fold on the zero-shot prompts of the *extraction* fold (validation), then the
   accuracy is measured on the test fold at that ``L``. Every input is tested exactly once (two folds).
4. **Controls** at the same ``L``: ``n_random`` Gaussian vectors of norm ``|v|`` (mean accuracy), and
   the vector extracted in the same way from the same prompts with the demo labels permuted among the
   demos (a derangement: every demo's label is another demo's).

Accuracy is argmax accuracy of the answer's first token at the last position.

Cost per fold: one decomposition forward of the extraction prompts (twice: clean and shuffled), then
``(n_layers + 1) * (2 + n_random)`` forwards of the zero-shot prompts for the sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from icl_circuits import fast_weights as fw
from icl_circuits.errors import InputError, TaskError
from icl_circuits.prompt_roles import render_examples


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
class TransplantResult:
    """Zero-shot accuracy on held-out queries with the task vector and its controls.

    ``sweep``: one row per fold and layer with validation and test accuracies (vector, random,
    shuffled); the headline numbers use each fold's layer chosen on validation.
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

    def to_dict(self) -> dict[str, Any]:
        """The JSON ``transplant`` block."""
        return {
            "zero_shot_acc": self.zero_shot_acc, "with_vector_acc": self.with_vector_acc,
            "random_control_acc": self.random_control_acc, "shuffled_control_acc": self.shuffled_control_acc,
            "n_test": self.n_test, "layer_per_fold": list(self.layers),
            "heads_per_fold": [[list(h) for h in hs] for hs in self.heads],
            "vector_norm_per_fold": list(self.vector_norm), "n_random": self.n_random, "seed": self.seed,
            "sweep": [dict(r) for r in self.sweep],
        }  # fmt: skip

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        import pandas as pd

        return pd.DataFrame(list(self.sweep))

    def plot(self) -> list[Any]:  # list[plotly Figure]
        """[headline accuracies, test accuracy by layer]. Pure: returns the figures."""
        import plotly.graph_objects as go

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
                            yaxis_title="accuracy", yaxis_range=[0, 1.05])  # fmt: skip
        return [bars, sweep]

    def _repr_html_(self) -> str:
        head = (f"<b>Transplant</b> {self.task}: zero-shot {self.zero_shot_acc:.3f}, with vector "
                f"{self.with_vector_acc:.3f}, random {self.random_control_acc:.3f}, shuffled "
                f"{self.shuffled_control_acc:.3f} (n={self.n_test}, layers {list(self.layers)})")  # fmt: skip
        return head + self.to_dataframe().to_html(index=False, float_format="%.3f")


def _fixed_inputs(task: Any) -> list[str]:
    """Inputs of ``task`` that have a fixed answer (``task.lookup``), in a stable order."""
    from icl_circuits import corpus

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
    from icl_circuits.tasks import FewShot, Pair

    n = example.n_shots
    if n < 2:
        raise TaskError("shuffling labels needs at least 2 demos")
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == np.arange(n)):
            break
    demos = tuple(Pair(d.input, example.demos[int(j)].output) for d, j in zip(example.demos, perm))
    return FewShot(demos, example.query, example.flipped)


def _extraction_examples(task: Any, shots: int, queries: set[str], n: int, rng: np.random.Generator) -> list[Any]:
    out: list[Any] = []
    for _ in range(200 * n):
        ex = task.draw(rng, shots)
        if ex.query.input in queries:
            out.append(ex)
            if len(out) == n:
                return out
    raise TaskError(f"task {task.name!r}: could not draw {n} {shots}-shot prompts with queries in the fold")


def transplant_test(
    model: Any,
    task: Any,
    shots: int,
    *,
    heads: str | Sequence[tuple[int, int]] = "auto",
    n_heads: int = 4,
    n_prompts: int = 64,
    n_random: int = 5,
    seed: int = 0,
    layers: Sequence[int] | None = None,
) -> TransplantResult:
    """Run the transplant test (module doc) for ``task`` (a name or a Task) with ``shots``-shot extraction.

    Raises:
        TaskError: a task without a fixed input -> output map, or ``shots < 2``.
        InputError: bad heads or layers.
    """
    from icl_circuits.models import model_info
    from icl_circuits.prompts import check_task
    from icl_circuits.tasks import FewShot, Pair, get_task

    if isinstance(task, str):
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
    totals = {"zero": 0.0, "vector": 0.0, "random": 0.0, "shuffled": 0.0}
    chosen_layers, chosen_heads, norms = [], [], []
    for f, (train_keys, test_keys) in enumerate(((folds[0], folds[1]), (folds[1], folds[0]))):
        examples = _extraction_examples(task, shots, set(train_keys), n_prompts, rng)
        shuffled = [derange_labels(ex, rng) for ex in examples]
        tok, roles, ans, _ = render_examples(model, checked, examples)
        tok_s, roles_s, _, _ = render_examples(model, checked, shuffled)
        if heads == "auto":
            dec_all = fw.decompose(model, tok, roles)
            hs = fw.summarize(model, dec_all, ans).best(n_heads)
        else:
            hs = fw.parse_heads(heads, model)
        vec = fw.task_vector(fw.decompose(model, tok, roles, hs), hs)
        vec_s = fw.task_vector(fw.decompose(model, tok_s, roles_s, hs), hs)
        randoms = torch.randn(n_random, vec.shape[0], generator=gen)
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
        rows += per_layer
        chosen_layers.append(int(best["layer"]))
        chosen_heads.append(tuple(hs))
        norms.append(float(vec.norm()))
    n = len(inputs)
    return TransplantResult(
        model_info(model).spec, task.name, shots, totals["zero"] / n, totals["vector"] / n, totals["random"] / n,
        totals["shuffled"] / n, n, tuple(chosen_layers), tuple(chosen_heads), tuple(norms), tuple(rows), n_random, seed,
    )  # fmt: skip


def _acc(logits: torch.Tensor, answers: torch.Tensor) -> float:
    return float((logits.argmax(-1) == answers).float().mean())
