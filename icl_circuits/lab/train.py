"""Train a small GPT-2 on the synthetic ICL corpus with checkpoints, a per-family log and exact resume.

Next-token prediction on :func:`icl_circuits.tasks.corpus.labelled_training_batch`: the loss counts the
tokens the corpus marks (repeated segments, few-shot answers, predictable demo labels). The run folder::

    RUN_DIR/lab_config.json    the config, thread count and versions
    RUN_DIR/train_log.jsonl    one line per step: lr, loss, loss per kind (repeat, recorded, bound, rule)
    RUN_DIR/step-000400/       a Hugging Face model folder: load_model("RUN_DIR/step-000400") works;
                               also corpus.json, training_record.json, optimizer.pt, rng_state.json

Each checkpoint is built in a temporary folder and renamed in (:func:`icl_circuits.io.atomic_folder`), so
Ctrl-C or a crash leaves every completed checkpoint whole. ``resume=True`` reloads the last one -- weights,
AdamW state and the corpus generator's state -- so a resumed run is the same computation as an
uninterrupted one: for one seed and thread count the weights are bit-identical (tested). The fixtures
(``fixtures/train.py``) are trained with the same model builder, schedule and loss.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl_circuits.errors import InputError
from icl_circuits.io import atomic_folder, atomic_write_json, atomic_write_text, check_output_dir, versions
from icl_circuits.lab.config import LabConfig
from icl_circuits.results import Result, series_colors
from icl_circuits.tasks import corpus

CONFIG_FILE = "lab_config.json"
LOG_FILE = "train_log.jsonl"
CHECKPOINT_PREFIX = "step-"
KINDS = ("repeat", *corpus.FAMILIES)


# ---------------------------------------------------------------- pieces shared with fixtures/train.py


def build_model(
    *, n_layer: int, n_head: int, n_embd: int, n_inner: int, n_ctx: int, seed: int, attn_only: bool = False
) -> Any:  # -> GPT2LMHeadModel
    """A freshly initialised HF GPT-2 (no dropout) over the corpus vocabulary; ``torch.manual_seed(seed)`` first."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=len(corpus.VOCAB), n_positions=n_ctx, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        n_inner=n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=corpus.TOKEN_ID[corpus.BOS], eos_token_id=corpus.TOKEN_ID[corpus.BOS],
        pad_token_id=corpus.TOKEN_ID[corpus.PAD],
    )  # fmt: skip
    torch.manual_seed(seed)
    model: Any = GPT2LMHeadModel(cfg)
    if attn_only:
        with torch.no_grad():
            block: Any
            for block in model.transformer.h:
                block.mlp.c_proj.weight.zero_()
                block.mlp.c_proj.bias.zero_()
        freeze_mlps(model)
    return model


def freeze_mlps(model: Any) -> None:
    """Attention-only: stop gradients to every MLP (its zero output projection stays zero)."""
    block: Any
    for block in model.transformer.h:
        for p in block.mlp.parameters():
            p.requires_grad_(False)


def build_tokenizer() -> Any:  # -> PreTrainedTokenizerFast
    """The word-level tokenizer over :data:`icl_circuits.tasks.corpus.VOCAB` (saved beside every model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab=dict(corpus.TOKEN_ID), unk_token=corpus.UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=corpus.BOS, eos_token=corpus.BOS, pad_token=corpus.PAD,
        unk_token=corpus.UNK, model_max_length=64,
    )  # fmt: skip


def lr_at(step: int, *, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of the peak ``lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def make_optimizer(model: Any, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (betas 0.9, 0.98) over the parameters that train."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def batch_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, weighting: str) -> torch.Tensor:
    """The training loss of ``logits [batch, pos - 1, vocab]`` (predictions of tokens ``1..``) for ``ids [batch, pos]``.

    ``"token"``: mean cross-entropy over every position where ``mask[:, 1:]``; ``"sequence"``: each sequence's
    masked tokens averaged, then the mean over sequences.
    """
    target_mask = mask[:, 1:]
    if weighting == "sequence":
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        w = target_mask.float()
        return ((nll * w).sum(1) / w.sum(1).clamp(min=1)).mean()
    return torch.nn.functional.cross_entropy(logits[target_mask], ids[:, 1:][target_mask])


@torch.no_grad()
def sequence_losses(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[batch]``: each sequence's mean cross-entropy over its trained tokens (nats), for the per-kind log."""
    nll = torch.nn.functional.cross_entropy(logits.detach().transpose(1, 2), ids[:, 1:], reduction="none")
    w = mask[:, 1:].float()
    return (nll * w).sum(1) / w.sum(1).clamp(min=1)


# ---------------------------------------------------------------- the run folder


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint of a run, by step (temporary folders are not listed)."""
    out = []
    for p in Path(run_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        tail = p.name[len(CHECKPOINT_PREFIX) :]
        if p.is_dir() and tail.isdigit() and (p / "model.safetensors").is_file():
            out.append((int(tail), p))
    return sorted(out)


def read_log(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The training log's rows (a half-written last line, left by a crash, is dropped)."""
    path = Path(run_dir) / LOG_FILE
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def read_run_config(run_dir: str | os.PathLike[str]) -> LabConfig:
    """The config a run was started with (``RUN_DIR/lab_config.json``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{str(run_dir)!r} is not a training run: no {CONFIG_FILE} (make one with icl-circuits train)")
    return LabConfig.from_dict(json.loads(path.read_text())["config"], where=str(path))


@dataclass(frozen=True)
class TrainRun(Result):
    """A finished (or resumed-and-finished) training run: where it is and what it logged."""

    run_dir: Path
    config: LabConfig
    checkpoints: tuple[tuple[int, Path], ...]
    threads: int
    wall_time_s: float
    resumed_from: int | None = None
    log: tuple[dict[str, Any], ...] = field(default=(), repr=False)

    def to_dataframe(self) -> Any:  # pandas.DataFrame
        """One row per step: ``step, lr, loss`` and ``loss_<kind>`` (NaN where a batch had no sequence of it)."""
        import pandas as pd

        rows = [{"step": r["step"], "lr": r["lr"], "loss": r["loss"],
                 **{f"loss_{k}": r["loss_by_kind"].get(k, float("nan")) for k in KINDS}} for r in self.log]  # fmt: skip
        return pd.DataFrame(rows, columns=["step", "lr", "loss", *[f"loss_{k}" for k in KINDS]])

    def plot(self, window: int = 25) -> Any:  # plotly Figure
        """Training loss per kind against step (rolling mean over ``window`` steps). Pure."""
        return loss_figure(self.to_dataframe(), window)

    def to_dict(self) -> dict[str, Any]:
        """Where the run is, its checkpoints and its log (JSON-ready)."""
        return {"run_dir": str(self.run_dir), "config": self.config.to_dict(),
                "checkpoints": [[s, str(p)] for s, p in self.checkpoints], "threads": self.threads,
                "wall_time_s": self.wall_time_s, "resumed_from": self.resumed_from, "log": list(self.log)}  # fmt: skip

    def summary(self) -> str:
        last = self.checkpoints[-1][0] if self.checkpoints else None
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from is not None else ""
        return (f"{self.config.name}: {len(self.checkpoints)} checkpoints up to step {last} in {self.run_dir} "
                f"({self.wall_time_s:.0f} s, {self.threads} thread(s){resumed})")  # fmt: skip



def kind_colors(*more: str) -> dict[str, str]:
    """One colour per kind of sequence (and ``"loss"``), the same in every lab figure; ``more`` names come after."""
    return series_colors(["loss", *KINDS, *more])


def loss_figure(df: Any, window: int = 25) -> Any:
    """Loss per kind of sequence (rolling mean) against the training step, from a log DataFrame. Pure."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for col in ["loss", *[f"loss_{k}" for k in KINDS]]:
        if col in df and df[col].notna().any():
            y = df[col].rolling(window, min_periods=1).mean()
            name = col.replace("loss_", "") or col
            fig.add_trace(go.Scatter(x=df["step"], y=y, mode="lines", name=name,
                                     line={"color": kind_colors()[name]}))  # fmt: skip
    fig.update_layout(title=f"training loss (rolling mean over {window} steps)", xaxis_title="step",
                      yaxis_title="loss (nats)")  # fmt: skip
    return fig


def _save_checkpoint(run_dir: Path, step: int, model: Any, opt: torch.optim.Optimizer, rng: np.random.Generator,
                     cfg: LabConfig, threads: int, loss: float | None) -> Path:  # fmt: skip
    target = run_dir / checkpoint_name(step)
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        build_tokenizer().save_pretrained(tmp)
        (tmp / "corpus.json").write_text(json.dumps(cfg.corpus.to_dict(), indent=2) + "\n")
        record = {"lab_config": cfg.to_dict(), "step": step, "seed": cfg.seed, "threads": threads,
                  "mean_loss_since_last_checkpoint": loss, "versions": versions()}  # fmt: skip
        (tmp / "training_record.json").write_text(json.dumps(record, indent=2) + "\n")
        torch.save(opt.state_dict(), tmp / "optimizer.pt")
        (tmp / "rng_state.json").write_text(json.dumps(rng.bit_generator.state) + "\n")
    return target


def _load_checkpoint(folder: Path, cfg: LabConfig) -> tuple[Any, torch.optim.AdamW, np.random.Generator]:
    from transformers import GPT2LMHeadModel

    model: Any = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    if cfg.attn_only:
        freeze_mlps(model)
    opt = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    opt.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    rng = np.random.default_rng()
    rng.bit_generator.state = json.loads((folder / "rng_state.json").read_text())
    return model, opt, rng


def train(
    config: LabConfig,
    out: str | os.PathLike[str],
    *,
    resume: bool = False,
    threads: int | None = None,
    progress: bool = True,
) -> TrainRun:
    """Train ``config`` into the run folder ``out`` (see the module docstring for its files).

    Args:
        resume: continue the run in ``out`` from its last complete checkpoint (its config must equal ``config``).
        threads: torch CPU threads for the run (default: the current setting); recorded, because the weights
            are bit-reproducible for a seed *and* a thread count.
        progress: a tqdm bar with the loss.

    Raises:
        InputError: ``out`` already holds a run and ``resume`` is false; ``resume`` with no run or no
            checkpoint in ``out``, or with a different config.
        OutputError: ``out`` cannot be written.
    """
    from tqdm.auto import tqdm

    run_dir = check_output_dir(out)
    threads = int(threads or torch.get_num_threads())
    torch.set_num_threads(threads)
    have_run = (run_dir / CONFIG_FILE).is_file()
    resumed_from: int | None = None
    if resume:
        saved = read_run_config(run_dir)
        if saved != config:
            diff = {k: (v, config.to_dict()[k]) for k, v in saved.to_dict().items() if config.to_dict()[k] != v}
            raise InputError(f"--resume: {str(run_dir)!r} was trained with another config (saved vs given: {diff})")
        done = list_checkpoints(run_dir)
        if not done:
            raise InputError(f"--resume: {str(run_dir)!r} has no complete checkpoint; start it again without --resume")
        resumed_from, folder = done[-1]
        model, opt, rng = _load_checkpoint(folder, config)
        recorded = json.loads((run_dir / CONFIG_FILE).read_text()).get("threads")
        if recorded != threads:
            print(f"note: the run used {recorded} thread(s), resuming with {threads}: the result is not "
                  "bit-identical to an uninterrupted run", file=sys.stderr)  # fmt: skip
        kept = [r for r in read_log(run_dir) if r["step"] <= resumed_from]
        atomic_write_text(run_dir / LOG_FILE, "".join(json.dumps(r) + "\n" for r in kept))
    else:
        if have_run:
            raise InputError(f"{str(run_dir)!r} already holds a training run; use --resume to continue it, "
                             "or another --out")  # fmt: skip
        atomic_write_json(run_dir / CONFIG_FILE, {"config": config.to_dict(), "threads": threads,
                                                  "versions": versions()})  # fmt: skip
        (run_dir / LOG_FILE).write_text("")
        model = build_model(n_layer=config.n_layer, n_head=config.n_head, n_embd=config.n_embd,
                            n_inner=config.n_inner, n_ctx=config.corpus.n_ctx, seed=config.seed,
                            attn_only=config.attn_only)  # fmt: skip
        opt = make_optimizer(model, lr=config.lr, weight_decay=config.weight_decay)
        rng = np.random.default_rng(config.seed)
        _save_checkpoint(run_dir, 0, model, opt, rng, config, threads, None)
    start_step = resumed_from or 0
    to_save = set(config.checkpoint_steps())
    model.train()
    start = time.time()
    window: list[float] = []
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc=config.name,
               disable=not progress, dynamic_ncols=True)  # fmt: skip
    try:
        with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
            for step in bar:
                lr = lr_at(step, lr=config.lr, warmup=config.warmup, steps=config.steps)
                for g in opt.param_groups:
                    g["lr"] = lr
                ids, mask, kinds = corpus.labelled_training_batch(
                    rng, config.corpus, config.batch_size, repeat_only=step < config.repeat_only_steps
                )
                logits = model(ids).logits[:, :-1]
                loss = batch_loss(logits, ids, mask, config.loss_weighting)
                per_seq = sequence_losses(logits, ids, mask)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                value = float(loss.item())
                window.append(value)
                by_kind: dict[str, list[float]] = defaultdict(list)
                for kind, v in zip(kinds, per_seq.tolist()):
                    by_kind[kind].append(v)
                row = {"step": step + 1, "lr": lr, "loss": value,
                       "loss_by_kind": {k: float(np.mean(v)) for k, v in by_kind.items()},
                       "n_by_kind": {k: len(v) for k, v in by_kind.items()}}  # fmt: skip
                log.write(json.dumps(row) + "\n")
                log.flush()
                if (step + 1) % 10 == 0:
                    bar.set_postfix(loss=f"{np.mean(window[-10:]):.3f}")
                if step + 1 in to_save:
                    log.flush()
                    os.fsync(log.fileno())
                    _save_checkpoint(run_dir, step + 1, model, opt, rng, config, threads, float(np.mean(window)))
                    window = []
    except KeyboardInterrupt:
        done = list_checkpoints(run_dir)
        print(f"\ninterrupted: {len(done)} complete checkpoint(s) in {run_dir}, the last at step {done[-1][0]}; "
              "continue with --resume", file=sys.stderr)  # fmt: skip
        raise
    finally:
        bar.close()
    return TrainRun(run_dir, config, tuple(list_checkpoints(run_dir)), threads, round(time.time() - start, 1),
                    resumed_from, tuple(read_log(run_dir)))  # fmt: skip
