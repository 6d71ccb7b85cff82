"""The training-lab configuration: architecture, corpus knobs, optimiser, steps and checkpoints.

A config is a flat TOML (or JSON) file; the corpus knobs (:class:`~icl_circuits.tasks.corpus.CorpusConfig`)
sit in a ``[corpus]`` table::

    name = "phase-change"
    n_layer = 2
    n_head = 4
    n_embd = 64
    attn_only = true
    steps = 1200
    checkpoint_every = 50
    [corpus]
    repeat_share = 0.5

Every key is checked: an unknown key, a wrong type or a value out of range is an
:class:`~icl_circuits.errors.InputError` naming the key (with the closest known key for a typo).
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from icl_circuits.errors import InputError
from icl_circuits.tasks import corpus

LOSS_WEIGHTINGS = ("token", "sequence")


@dataclass(frozen=True)
class LabConfig:
    """One training run. Model: a Hugging Face GPT-2 over the corpus vocabulary (word-level tokenizer).

    ``attn_only``: every MLP's output projection is zero and frozen, so each block adds only its attention
    output (Olsson et al. 2022's attention-only models; the MLP of width ``n_inner`` still runs and adds 0).
    ``repeat_only_steps``: the first steps see only repeated segments. ``loss_weighting``: ``"token"``
    averages over every trained token of the batch; ``"sequence"`` averages each sequence's trained tokens
    first. AdamW (betas 0.9, 0.98), gradient norm clipped to 1, learning rate: linear warm-up over
    ``warmup`` steps then cosine decay to 10% of ``lr``. ``checkpoint_every``: a loadable model folder
    every that many steps (and at step 0 and the last step).
    """

    name: str = "run"
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_inner: int = 256
    attn_only: bool = False
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    repeat_only_steps: int = 0
    loss_weighting: str = "token"
    checkpoint_every: int = 100
    seed: int = 0
    corpus: corpus.CorpusConfig = field(default_factory=corpus.CorpusConfig)

    def __post_init__(self) -> None:
        for name, low in (("n_layer", 1), ("n_head", 1), ("n_embd", 1), ("n_inner", 1), ("steps", 1),
                          ("batch_size", 1), ("warmup", 0), ("repeat_only_steps", 0), ("checkpoint_every", 1),
                          ("seed", 0)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InputError(f"config {name} must be an integer >= {low}, got {value!r}")
        if self.n_embd % self.n_head:
            raise InputError(f"config n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise InputError(f"config {name} must be a number >= 0, got {value!r}")
        if not isinstance(self.attn_only, bool):
            raise InputError(f"config attn_only must be true or false, got {self.attn_only!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise InputError(f"config loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise InputError(f"config name must be a non-empty string, got {self.name!r}")
        check_corpus(self.corpus)

    def checkpoint_steps(self) -> list[int]:
        """The steps saved: 0 (untrained), every ``checkpoint_every``, and the last."""
        return sorted({0, *range(self.checkpoint_every, self.steps + 1, self.checkpoint_every), self.steps})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["corpus"] = {k: v for k, v in self.corpus.to_dict().items() if k != "recorded_maps"}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> LabConfig:
        """Build from plain data (a parsed TOML/JSON file), checking every key."""
        if not isinstance(d, dict):
            raise InputError(f"{where} must be a table of settings, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        kw: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                raise InputError(f"{where}: unknown setting {key!r}{_near(key, known)}; known: {', '.join(known)}")
            kw[key] = value
        raw_corpus = kw.pop("corpus", {})
        if not isinstance(raw_corpus, dict):
            raise InputError(f"{where}: [corpus] must be a table, got {type(raw_corpus).__name__}")
        return cls(**kw, corpus=corpus_from_dict(raw_corpus, where))

    def with_overrides(self, overrides: dict[str, Any]) -> LabConfig:
        """A copy with dotted keys replaced (``"n_layer"``, ``"corpus.repeat_share"``), checked as a file is."""
        d = self.to_dict()
        for key, value in overrides.items():
            parts = key.split(".")
            if len(parts) == 2 and parts[0] == "corpus":
                d["corpus"][parts[1]] = value
            elif len(parts) == 1:
                d[key] = value
            else:
                raise InputError(f"override {key!r}: use a setting name or corpus.NAME")
        return LabConfig.from_dict(d, where=f"config with {overrides}")


def _near(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def corpus_from_dict(d: dict[str, Any], where: str = "config") -> corpus.CorpusConfig:
    """A :class:`CorpusConfig` from a ``[corpus]`` table; unknown keys refused (``recorded_maps`` is derived)."""
    known = [f.name for f in fields(corpus.CorpusConfig)]
    for key in d:
        if key not in known and key != "recorded_maps":
            raise InputError(f"{where}: unknown corpus setting {key!r}{_near(key, known)}; known: {', '.join(known)}")
    cfg = corpus.CorpusConfig.from_dict(d)
    check_corpus(cfg, where)
    return cfg


def check_corpus(cfg: corpus.CorpusConfig, where: str = "config") -> None:
    """Refuse corpus knobs that cannot generate a corpus (shares, demo counts, shifts, rates)."""

    def bad(msg: str) -> InputError:
        return InputError(f"{where}: corpus {msg}")

    if not 0.0 <= float(cfg.repeat_share) <= 1.0:
        raise bad(f"repeat_share must be in [0, 1], got {cfg.repeat_share!r}")
    shares = tuple(cfg.family_shares)
    if len(shares) != 3 or any(not isinstance(s, (int, float)) or s < 0 for s in shares) or sum(shares) <= 0:
        raise bad(f"family_shares must be 3 non-negative numbers (recorded, bound, rule) with a positive sum, "
                  f"got {cfg.family_shares!r}")  # fmt: skip
    max_demos = (cfg.n_ctx - 4) // 4
    if not 1 <= cfg.min_demos <= min(cfg.max_demos, max_demos):
        raise bad(f"needs 1 <= min_demos <= max_demos and min_demos <= {max_demos} (n_ctx {cfg.n_ctx}); "
                  f"got min_demos={cfg.min_demos}, max_demos={cfg.max_demos}")  # fmt: skip
    if not cfg.train_shifts or any(not isinstance(s, int) or not 1 <= s <= 25 for s in cfg.train_shifts):
        raise bad(f"train_shifts must be a non-empty list of integers in 1..25, got {cfg.train_shifts!r}")
    if not isinstance(cfg.n_recorded, int) or cfg.n_recorded < 1:
        raise bad(f"n_recorded must be an integer >= 1, got {cfg.n_recorded!r}")
    z = cfg.zipf_exponent
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not 0.0 <= z <= 10.0:
        raise bad(f"zipf_exponent must be a number in [0, 10], got {z!r}")
    if not 0.0 <= float(cfg.noise_rate) < 1.0:
        raise bad(f"noise_rate must be in [0, 1), got {cfg.noise_rate!r}")
    lo, hi = cfg.segment_len
    if not 2 <= lo <= hi <= cfg.n_ctx - 1:
        raise bad(f"segment_len must be [lo, hi] with 2 <= lo <= hi <= n_ctx - 1, got {cfg.segment_len!r}")


def read_table(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a ``.toml`` or ``.json`` file into plain data.

    Raises:
        InputError: a missing file, another suffix, or a file that does not parse (naming the file and the cause).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"config file {str(path)!r} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"config file {str(path)!r} cannot be read as UTF-8 text: {e}") from e
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"config file {str(path)!r} is not valid JSON: {e}") from e
    elif p.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise InputError("reading TOML needs Python >= 3.11 or `pip install tomli`; "
                                 "or give a .json config") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"config file {str(path)!r} is not valid TOML: {e}") from e
    else:
        raise InputError(f"config file {str(path)!r}: give a .toml or .json file")
    if not isinstance(data, dict):
        raise InputError(f"config file {str(path)!r} must hold a table of settings")
    return data


def load_config(path: str | os.PathLike[str], *, seed: int | None = None) -> LabConfig:
    """Read and check a config file; ``seed`` (when given) replaces the file's."""
    cfg = LabConfig.from_dict(read_table(path), where=f"config {str(path)!r}")
    return cfg if seed is None else replace(cfg, seed=seed)
