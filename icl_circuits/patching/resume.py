"""Resume a forward at block ``l``: run blocks ``l..L-1`` on a given residual, read one logit difference.

The exact-patching sweep (:mod:`icl_circuits.patching.exact`) leaves everything below the patched layer
untouched, so it caches one unpatched run and starts every patched run at the patched block. The
TransformerBridge's own ``start_at_layer`` does not help: in TransformerLens 4.3 it feeds the
residual in as ``inputs_embeds`` and still executes blocks ``0..l-1`` (their output is discarded),
so it costs a full forward (measured: 0.40 s for ``start_at_layer`` 6 and 11 and for none, GPT-2-small
size, batch 8 x 32).

How it works: :func:`capture_run` runs the model once with a forward pre-hook on every block that
records the positional and keyword arguments the Hugging Face model passes to it (attention mask,
rotary ``position_embeddings``, position ids...). :meth:`BaseRun.final_from` then calls
``model.blocks[l](x, *args, **kwargs)`` for ``l..L-1`` directly -- the bridge's own block modules, so
its hook points fire and ``model.hooks(...)`` patches apply -- with those arguments tiled to the
``n`` copies of the batch in ``x`` (tensors whose first axis is the batch), the KV cache dropped.
The final norm is applied at the positions the caller reads only (``ln_final(x[read_pos])``, the
unembedding's input); :meth:`BaseRun.logit_diff_from` reads the answer position and uses only the
answer-minus-contrast unembedding column::

    LD = ln_final(x[answer_pos]) . (W_U[:, answer] - W_U[:, contrast]) + b_U[answer] - b_U[contrast]

so a patched run never builds the ``[batch, pos, d_vocab]`` logits. (Mean ablation with a loss metric,
:mod:`icl_circuits.patching.ablation`, reads many positions and unembeds them itself.)
With final-logit soft-capping
(Gemma-2: ``logit = cap tanh(u / cap)``, ``cfg.output_logits_soft_cap``) the answer and contrast logits are
capped separately, ``LD = cap tanh(u_a / cap) - cap tanh(u_c / cap)`` (:func:`unembed_ld`). Any other
transform of the unembedding is refused by :meth:`BaseRun.check`, naming it.

Two shortcuts for sequential blocks (``mid = x + attn(x)``, ``out = mid + mlp(ln2(mid))``; not
``parallel_attn_mlp``): the last block stops at its ``hook_resid_mid`` (a hook raises) and its MLP
runs at the read positions only; and a run may start at a block's mid-residual (used for head
outputs, whose patch is ``(z' - z) @ W_O`` added there, so the patched layer's attention is skipped).

Safety: :meth:`BaseRun.check` resumes at the last block on two copies, whole, and compares with the
full forward; a mismatch (blocks that read something else) raises :class:`~icl_circuits.errors.InputError`
rather than give wrong numbers. The shortcuts are then tried the same way and used only if they
reproduce the full forward (``BaseRun.sequential``). Cost of a resumed run from block ``l``:
``(L - l - 1)`` blocks, the last block's attention, the MLP at one position, one ``d_model`` dot per row.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from icl_circuits.errors import InputError


@contextlib.contextmanager
def _block_inputs(model: Any, sink: list[tuple[tuple[Any, ...], dict[str, Any]] | None]) -> Iterator[None]:
    """Record each block's call arguments into ``sink[l]`` while the context is open (hooks removed on exit)."""
    handles = []

    def make(layer: int) -> Any:
        def pre_hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sink[layer] = (args, dict(kwargs))

        return pre_hook

    try:
        for layer, block in enumerate(model.blocks):
            handles.append(block.register_forward_pre_hook(make(layer), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def fused_activations(model: Any, enabled: bool = True) -> Iterator[None]:
    """Swap Hugging Face's Python-level tanh-GELU (``NewGELUActivation``, GPT-2's ``gelu_new``) for
    ``GELUTanh``, the same function as one fused PyTorch kernel, while the context is open.

    Results change by float rounding only (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` either
    way); at GPT-2-small size the Python version is a third of a block's time. Every swapped module is
    put back on exit, also on error. Other activations are left alone.
    """
    swapped: list[tuple[Any, str, Any]] = []
    try:
        if enabled:
            from transformers import activations as hf_act

            targets = [
                (parent, name, child)
                for parent in model.modules()
                for name, child in parent.named_children()
                if type(child) is hf_act.NewGELUActivation
            ]
            for parent, name, child in targets:
                setattr(parent, name, hf_act.GELUTanh())
                swapped.append((parent, name, child))
        yield
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


@contextlib.contextmanager
def float32_matmul(precision: str | None) -> Iterator[None]:
    """``torch.set_float32_matmul_precision(precision)`` while the context is open, restored on exit (also on
    error); ``None`` leaves it alone. On CPUs with AVX512-BF16, oneDNN's ``"medium"`` runs float32 GEMMs
    through bfloat16 units: SmolLM2's sweep 1.6-1.9x faster, effects within 6e-6 nats of ``"highest"``
    (``python -m icl_circuits.bench --model smollm2-135m real_precision``; README "Measured speed")."""
    if precision is None:
        yield
        return
    if precision not in ("highest", "high", "medium"):
        raise InputError(f"matmul precision must be 'highest', 'high' or 'medium', got {precision!r}")
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _tile(obj: Any, batch: int, n: int) -> Any:
    """``obj`` with every tensor whose first axis is the batch repeated ``n`` times (copy-major).

    A Hugging Face KV cache is replaced by ``None``: a resumed run must not read or extend the
    cache of the captured run.
    """
    if isinstance(obj, torch.Tensor):
        if n > 1 and batch > 1 and obj.ndim >= 2 and obj.shape[0] == batch:
            return obj.repeat(n, *([1] * (obj.ndim - 1)))
        return obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_tile(o, batch, n) for o in obj)
    if type(obj).__name__.endswith("Cache") and hasattr(obj, "update"):
        return None
    return obj


class _Stop(Exception):
    """Raised by a hook to end a block's forward at its mid-residual (carries it)."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__("stop at hook_resid_mid")
        self.value = value


@dataclass
class BaseRun:
    """One unpatched forward: cached activations, block inputs and the answer logit difference.

    ``acts[name]`` are detached clones ``[batch, ...]``; ``logit_diff [batch]`` comes from the full
    logits at ``positions [batch]``; ``answer_dir [batch, d_model]`` and ``answer_bias [batch]`` are
    ``W_U[:, a] - W_U[:, c]`` and ``b_U[a] - b_U[c]``. ``sequential`` (set by :meth:`check` once
    verified on this model): a block is ``mid = x + attn(x)``, ``out = mid + mlp(ln2(mid))``, so the
    last block's MLP runs at the answer positions only and a run can start at a mid-residual.
    """

    model: Any
    acts: dict[str, torch.Tensor]
    block_args: list[tuple[tuple[Any, ...], dict[str, Any]]]
    positions: torch.Tensor
    logit_diff: torch.Tensor
    answer_dir: torch.Tensor
    answer_bias: torch.Tensor
    sequential: bool = False
    logits: torch.Tensor | None = None  # [batch, pos, d_vocab] of the full forward, when capture_run kept them
    answer_tokens: torch.Tensor | None = None
    contrast_tokens: torch.Tensor | None = None
    unembed_gap: float = 0.0  # max |LD from the logits - LD from ln_final . W_U| on the captured run
    shortcut_note: str = ""  # why check() did not use the sequential shortcuts, when they raised (also warned)

    @property
    def batch(self) -> int:
        return int(self.logit_diff.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.model.blocks)

    def _call_block(self, layer: int, x: torch.Tensor, n: int) -> torch.Tensor:
        args, kwargs = self.block_args[layer]
        kw = {k: _tile(v, self.batch, n) for k, v in kwargs.items()}
        if "use_cache" in kw:
            kw["use_cache"] = False
        if args:
            out = self.model.blocks[layer](x, *_tile(tuple(args[1:]), self.batch, n), **kw)
        else:
            out = self.model.blocks[layer](**{**kw, "hidden_states": x})
        return out[0] if isinstance(out, (tuple, list)) else out

    def _mlp_tail(self, layer: int, mid: torch.Tensor) -> torch.Tensor:
        """``mid + mlp(ln2(mid))`` with the block's own modules (position-wise, any positions)."""
        block = self.model.blocks[layer]
        return mid + block.mlp(block.ln2(mid))

    def final_from(
        self,
        layer: int,
        x: torch.Tensor,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
        *,
        positions: torch.Tensor | None = None,
        mid: bool = False,
        shortcut: bool = True,
    ) -> torch.Tensor:
        """Run blocks ``layer..L-1`` on ``x [n * batch, pos, d_model]`` (copy-major) under ``fwd_hooks``.

        Returns ``ln_final`` of the final residual at ``positions [batch, P]`` (each example's read
        positions, the same in every copy; ``None``: all positions): ``[n * batch, P, d_model]``, the
        input of the unembedding. ``mid=True``: ``x`` is the mid-residual of ``layer`` (its attention
        already applied; needs ``sequential``). ``shortcut=False`` runs every block whole, as the model does.
        """
        rows = int(x.shape[0])
        if rows % self.batch:
            raise InputError(f"resumed input has {rows} rows, not a multiple of the batch {self.batch}")
        if mid and not self.sequential:
            raise InputError("a run can start at a mid-residual only on a model verified sequential (check())")
        n, last = rows // self.batch, self.n_layers - 1
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).expand(self.batch, -1)
        at_read = (torch.arange(rows, device=x.device)[:, None],
                   positions.to(x.device).repeat(n, 1))  # -> [rows, P, d_model]  # fmt: skip
        armed = {"on": False}

        def stop(t: torch.Tensor, hook: Any) -> None:
            if armed["on"]:
                raise _Stop(t)

        hooks = list(fwd_hooks)
        fast = shortcut and self.sequential
        if fast:
            hooks.append((f"blocks.{last}.hook_resid_mid", stop))
        with torch.no_grad(), self.model.hooks(fwd_hooks=hooks):
            if mid and layer == last:
                final = self._mlp_tail(last, x[at_read])
            else:
                if mid:
                    x = self._mlp_tail(layer, x)
                    layer += 1
                for l in range(layer, last if fast else last + 1):
                    x = self._call_block(l, x, n)
                if fast:  # the last block: attention everywhere, the MLP at the read positions only
                    armed["on"] = True
                    try:
                        self._call_block(last, x, n)
                        raise InputError(f"blocks.{last}.hook_resid_mid did not fire")
                    except _Stop as stopped:
                        x = stopped.value
                    finally:
                        armed["on"] = False
                    final = self._mlp_tail(last, x[at_read])
                else:
                    final = x[at_read]  # [rows, P, d_model]
            return self.model.ln_final(final)

    def logit_diff_from(
        self,
        layer: int,
        x: torch.Tensor,
        fwd_hooks: Sequence[tuple[str, Any]] = (),
        *,
        mid: bool = False,
        shortcut: bool = True,
    ) -> torch.Tensor:
        """:meth:`final_from` read at the answer positions: ``[n * batch]``, each row's
        answer-minus-contrast logit difference (:meth:`ld_from_normed`)."""
        n = int(x.shape[0]) // self.batch
        normed = self.final_from(layer, x, fwd_hooks, positions=self.positions[:, None], mid=mid, shortcut=shortcut)
        return self.ld_from_normed(normed[:, 0], n)

    def ld_from_normed(self, normed: torch.Tensor, n: int = 1) -> torch.Tensor:
        """``[n * batch]`` logit differences from the final normed residual at the answer, ``[n * batch, d_model]``."""
        if not softcap(self.model) or self.answer_tokens is None or self.contrast_tokens is None:
            return (normed * self.answer_dir.repeat(n, 1)).sum(-1) + self.answer_bias.repeat(n)
        return unembed_ld(self.model, normed, self.answer_tokens.repeat(n), self.contrast_tokens.repeat(n))

    def resid(self, layer: int) -> torch.Tensor:
        """``[batch, pos, d_model]``: the cached residual entering block ``layer``."""
        return self.acts[f"blocks.{layer}.hook_resid_pre"]

    def mid_resid(self, layer: int) -> torch.Tensor:
        """``[batch, pos, d_model]``: the cached residual after block ``layer``'s attention."""
        return self.acts[f"blocks.{layer}.hook_resid_mid"]

    def check(self, atol: float = 1e-4) -> None:
        """Resume at the last block on two copies and compare with the full forward; raise on a mismatch.

        Then try the shortcuts (MLP of the last block at the answer only; runs from a mid-residual)
        and keep them (``sequential``) only if they reproduce the same numbers.
        """
        last = self.n_layers - 1
        expected = self.logit_diff.repeat(2)
        tol = atol * (1.0 + float(self.logit_diff.abs().max()))
        if not self.unembed_gap <= tol:
            capped = " with soft-capping" if softcap(self.model) else ""
            raise InputError(
                f"this model's logits are not ln_final(x) @ W_U + b_U{capped}"
                f" (the logit difference differs by {self.unembed_gap:.2e}): an unembedding transform this module does "
                "not reproduce; exact patching is unsupported for this architecture -- use transformer_lens.patching"
            )
        ours = self.logit_diff_from(last, self.resid(last).repeat(2, 1, 1), shortcut=False)
        gap = float((ours - expected).abs().max())
        if not gap <= tol:
            raise InputError(
                f"resuming block {last} of this model reproduces the logit difference only to {gap:.2e} "
                "(the blocks read inputs this module does not capture: the unembedding reproduces the logits, so the "
                "difference is inside the blocks); exact patching is unsupported "
                "for this architecture -- use transformer_lens.patching instead"
            )
        self.sequential = False
        if f"blocks.{last}.hook_resid_mid" not in self.acts or bool(
            getattr(self.model.cfg, "parallel_attn_mlp", False)
        ):
            return
        self.sequential = True
        try:
            fast = self.logit_diff_from(last, self.resid(last).repeat(2, 1, 1))
            from_mid = (
                self.logit_diff_from(last - 1, self.mid_resid(last - 1).repeat(2, 1, 1), mid=True) if last else fast
            )
            ok = max(float((fast - expected).abs().max()), float((from_mid - expected).abs().max())) <= tol
        except Exception as e:  # noqa: BLE001 - a failing shortcut is not used; the exact path stays; said, not hidden
            ok = False
            self.shortcut_note = (f"the sequential-block shortcut raised {type(e).__name__}: {e}; every patched run "
                                  "uses whole blocks instead (same numbers, slower)")  # fmt: skip
            warnings.warn(self.shortcut_note, stacklevel=2)
        self.sequential = ok


def capture_run(
    model: Any,
    tokens: torch.Tensor,
    names: Sequence[str],
    answer_tokens: torch.Tensor,
    contrast_tokens: torch.Tensor,
    positions: torch.Tensor,
    *,
    keep_logits: bool = False,
) -> BaseRun:
    """One no-grad forward of ``tokens [batch, pos]`` caching ``names`` (plus every ``hook_resid_pre``);
    ``keep_logits``: also keep its ``[batch, pos, d_vocab]`` logits (``BaseRun.logits``)."""
    n_layers = len(model.blocks)
    resid = [f"blocks.{l}.hook_resid_{w}" for l in range(n_layers) for w in ("pre", "mid")]
    hook_dict = model.hook_dict  # a property the bridge rebuilds on every access (~1 ms): read it once
    wanted = [n for n in dict.fromkeys([*names, *resid]) if not n.endswith("hook_resid_mid") or n in hook_dict]
    final = "ln_final.hook_out" if "ln_final.hook_out" in hook_dict else None
    acts: dict[str, torch.Tensor] = {}

    def make(name: str) -> Any:
        def hook(tensor: torch.Tensor, hook: Any) -> None:
            acts[name] = tensor.detach().clone()

        return hook

    sink: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * n_layers
    hooks = [(n, make(n)) for n in [*wanted, *([final] if final else [])]]
    with torch.no_grad(), _block_inputs(model, sink), model.hooks(fwd_hooks=hooks):
        logits = model(tokens)
    missing = [n for n in wanted if n not in acts and not n.endswith("hook_resid_mid")]  # mid: only for shortcuts
    if missing or any(s is None for s in sink):
        raise InputError(f"these hook points did not fire on this model: {missing[:4]}; cannot patch them")
    rows = torch.arange(tokens.shape[0])
    ld = logits[rows, positions, answer_tokens] - logits[rows, positions, contrast_tokens]
    answer_dir, answer_bias = answer_direction(model, answer_tokens, contrast_tokens)
    run = BaseRun(
        model=model,
        acts=acts,
        block_args=[s for s in sink if s is not None],
        positions=positions,
        logit_diff=ld.detach().float(),
        answer_dir=answer_dir,
        answer_bias=answer_bias,
        logits=logits.detach() if keep_logits else None,
        answer_tokens=answer_tokens,
        contrast_tokens=contrast_tokens,
    )
    if final is not None:  # the unembedding this module applies, against the model's own logits
        direct = run.ld_from_normed(acts.pop(final)[rows, positions])
        run.unembed_gap = float((direct.float() - run.logit_diff).abs().max())
    return run


def softcap(model: Any) -> float:
    """The final-logit soft-cap of ``model`` (``cfg.output_logits_soft_cap``), 0.0 when it has none."""
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return float(cap) if isinstance(cap, (int, float)) and cap > 0 else 0.0


def unembed(model: Any, normed: torch.Tensor) -> torch.Tensor:
    """``[..., d_vocab]`` logits from the final normed residual ``[..., d_model]``: ``W_U``, ``b_U``, soft-cap."""
    logits = normed @ model.W_U.detach()
    b_u = getattr(model, "b_U", None)
    if b_u is not None:
        logits = logits + b_u.detach()
    cap = softcap(model)
    return cap * torch.tanh(logits / cap) if cap else logits


def unembed_ld(model: Any, normed: torch.Tensor, answer: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """``[rows]``: ``logit[answer] - logit[contrast]`` from ``normed [rows, d_model]`` (two columns, soft-capped)."""
    w_u = model.W_U.detach()
    b_u = getattr(model, "b_U", None)
    la, lc = (normed * w_u[:, answer].T).sum(-1), (normed * w_u[:, contrast].T).sum(-1)
    if b_u is not None:
        la, lc = la + b_u.detach()[answer], lc + b_u.detach()[contrast]
    cap = softcap(model)
    return cap * (torch.tanh(la / cap) - torch.tanh(lc / cap)) if cap else la - lc


def answer_direction(
    model: Any, answer_tokens: torch.Tensor, contrast_tokens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_U[:, a] - W_U[:, c]  [batch, d_model],  b_U[a] - b_U[c]  [batch])``: LD from the final normed residual."""
    w_u = model.W_U.detach()
    try:
        b_u = model.b_U.detach()
    except AttributeError:  # a bias-free unembedding
        b_u = torch.zeros(w_u.shape[1], dtype=w_u.dtype, device=w_u.device)
    return (w_u[:, answer_tokens] - w_u[:, contrast_tokens]).T.contiguous(), b_u[answer_tokens] - b_u[contrast_tokens]
