"""The synthetic ICL corpus the fixture models are trained on, and its few-shot prompt families.

One word-level vocabulary of readable tokens::

    <bos> <pad> <unk> -> ;  a..z  A..Z  0..9

Few-shot sequences read ``<bos> k1 -> v1 ; k2 -> v2 ; ... ; kq -> vq`` with keys and values in
``a..z``. Task families separate the two layers of explanation:

* ``recorded``: fixed permutations of ``a..z``, the same in every training sequence (learnable
  into the weights; one demo identifies which one);
* ``bound``: a fresh random permutation per sequence (only the context can tell; the query key is
  one of the demo keys);
* ``rule``: shift-by-s over the ordered alphabet, ``s`` drawn per sequence from
  ``train_shifts`` (the query key is never a demo key, so the demos must reveal ``s``);
  shifts outside ``train_shifts`` are held out as unseen tasks;
* ``repeat``: a random segment over ``a..z A..Z 0..9`` repeated to fill the context (teaches
  induction and copying). Upper-case letters and digits never appear as few-shot labels, so they
  serve as unseen labels for the "A -> B, C -> D, E -> ?" binding probe.

Demo labels are flipped to a random other letter with probability ``noise_rate`` (not trained
on), so behaviour under label noise exists to be studied. Everything is drawn from a
``numpy.random.Generator``: the same seed gives the same corpus.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

BOS, PAD, UNK, ARROW, SEP = "<bos>", "<pad>", "<unk>", "->", ";"
LETTERS: tuple[str, ...] = tuple("abcdefghijklmnopqrstuvwxyz")
UPPER: tuple[str, ...] = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
DIGITS: tuple[str, ...] = tuple("0123456789")
VOCAB: tuple[str, ...] = (BOS, PAD, UNK, ARROW, SEP, *LETTERS, *UPPER, *DIGITS)
TOKEN_ID: dict[str, int] = {t: i for i, t in enumerate(VOCAB)}
FAMILIES = ("recorded", "bound", "rule")


@dataclass(frozen=True)
class CorpusConfig:
    """What a fixture's training corpus contains. Saved as ``corpus.json`` beside the weights."""

    seed: int = 0
    n_ctx: int = 64
    repeat_share: float = 0.25
    family_shares: tuple[float, float, float] = (0.25, 0.4, 0.35)  # recorded, bound, rule
    min_demos: int = 1
    max_demos: int = 12
    train_shifts: tuple[int, ...] = (1, 2, 3, 4, 5)
    n_recorded: int = 2
    zipf_exponent: float = 0.0  # which recorded map a sequence uses: P(j) ~ (j + 1)^-a; 0 = uniform
    noise_rate: float = 0.05
    segment_len: tuple[int, int] = (4, 23)
    recorded_seed: int = 1234  # fixes the recorded permutations (part of the "record")
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["recorded_maps"] = [dict(m) for m in recorded_maps(self)]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CorpusConfig:
        keys = {f for f in cls.__dataclass_fields__}
        kw: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in keys}
        return cls(**kw)


def recorded_maps(cfg: CorpusConfig) -> list[dict[str, str]]:
    """The fixed key->value permutations of the ``recorded`` family (derangements of a..z)."""
    rng = np.random.default_rng(cfg.recorded_seed)
    maps: list[dict[str, str]] = []
    while len(maps) < cfg.n_recorded:
        perm = rng.permutation(len(LETTERS))
        if np.any(perm == np.arange(len(LETTERS))):
            continue
        maps.append({k: LETTERS[int(j)] for k, j in zip(LETTERS, perm)})
    return maps


def recorded_weights(cfg: CorpusConfig) -> np.ndarray:
    """``[n_recorded]``: the probability of each recorded map, Zipfian ``P(j) = (j + 1)^-a / Z`` with
    ``a = zipf_exponent`` (Chan et al. 2022's skewed class distribution; ``a = 0`` is uniform)."""
    w = np.arange(1, cfg.n_recorded + 1, dtype=float) ** -float(cfg.zipf_exponent)
    return w / w.sum()


def recorded_index(rng: np.random.Generator, cfg: CorpusConfig) -> int:
    """Which recorded map a sequence uses, drawn from :func:`recorded_weights`. ``zipf_exponent == 0``
    draws exactly as before the knob existed (``rng.integers``), so the committed fixtures' corpora are
    unchanged."""
    if not cfg.zipf_exponent:
        return int(rng.integers(cfg.n_recorded))
    return int(rng.choice(cfg.n_recorded, p=recorded_weights(cfg)))


def shift_map(shift: int) -> dict[str, str]:
    """The rule task ``k -> letter(index(k) + shift mod 26)``."""
    return {k: LETTERS[(i + shift) % len(LETTERS)] for i, k in enumerate(LETTERS)}


def random_map(rng: np.random.Generator) -> dict[str, str]:
    """A fresh random binding of a..z to a..z (the ``bound`` family)."""
    perm = rng.permutation(len(LETTERS))
    return {k: LETTERS[int(j)] for k, j in zip(LETTERS, perm)}


@dataclass(frozen=True)
class Episode:
    """One few-shot sequence: demos, the query, its answer, and which demo labels were flipped."""

    family: str
    mapping_name: str
    demos: tuple[tuple[str, str], ...]
    query: str
    answer: str
    flipped: tuple[bool, ...]

    def tokens(self, with_answer: bool = True) -> list[str]:
        out = [BOS]
        for k, v in self.demos:
            out += [k, ARROW, v, SEP]
        out += [self.query, ARROW]
        return out + [self.answer] if with_answer else out


def sample_episode(
    rng: np.random.Generator,
    cfg: CorpusConfig,
    family: str,
    n_demos: int,
    *,
    shift: int | None = None,
    mapping: dict[str, str] | None = None,
    mapping_name: str | None = None,
    noise_rate: float | None = None,
) -> Episode:
    """Draw one few-shot episode of ``family`` with ``n_demos`` demos (keys distinct).

    ``bound``: the query key is one of the demo keys (0 demos: any key, answer unknowable).
    ``rule`` and ``recorded``: the query key is never a demo key.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    if not 0 <= n_demos <= len(LETTERS) - 1:
        raise ValueError(f"n_demos must be in 0..{len(LETTERS) - 1}, got {n_demos}")
    if mapping is None:
        if family == "bound":
            mapping, mapping_name = random_map(rng), "random"
        elif family == "rule":
            s = int(rng.choice(cfg.train_shifts)) if shift is None else shift
            mapping, mapping_name = shift_map(s), f"shift{s}"
        else:
            j = recorded_index(rng, cfg)
            mapping, mapping_name = recorded_maps(cfg)[j], f"recorded{j}"
    keys = [LETTERS[int(i)] for i in rng.permutation(len(LETTERS))]
    if family == "bound" and n_demos > 0:
        demo_keys = keys[:n_demos]
        query = demo_keys[int(rng.integers(n_demos))]
    else:
        demo_keys, query = keys[:n_demos], keys[n_demos]
    rate = cfg.noise_rate if noise_rate is None else noise_rate
    demos, flipped = [], []
    for k in demo_keys:
        v = mapping[k]
        flip = bool(rng.random() < rate)
        if flip:
            v = LETTERS[(LETTERS.index(v) + int(rng.integers(1, len(LETTERS)))) % len(LETTERS)]
        demos.append((k, v))
        flipped.append(flip)
    return Episode(family, mapping_name or "custom", tuple(demos), query, mapping[query], tuple(flipped))


def repeated_segment(rng: np.random.Generator, cfg: CorpusConfig) -> list[str]:
    """``<bos>`` then one random segment over a..z A..Z 0..9 repeated to fill the context."""
    alphabet = LETTERS + UPPER + DIGITS
    n = int(rng.integers(cfg.segment_len[0], cfg.segment_len[1] + 1))
    seg = [alphabet[int(i)] for i in rng.integers(len(alphabet), size=n)]
    body = (seg * (cfg.n_ctx // n + 1))[: cfg.n_ctx - 1]
    return [BOS, *body]


def encode(tokens: list[str]) -> list[int]:
    return [TOKEN_ID[t] for t in tokens]


def training_batch(
    rng: np.random.Generator, cfg: CorpusConfig, batch_size: int, *, repeat_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch: ``ids [batch, n_ctx]`` and ``loss_mask [batch, n_ctx]``.

    ``loss_mask[b, t]`` says whether the prediction *of* token ``t`` (made at ``t - 1``) counts:
    every token of repeated segments; the answer of few-shot ones, and the (unflipped) demo labels of
    ``rule`` and ``recorded`` sequences (a ``bound`` demo label is a fresh draw nobody can predict).
    """
    ids, mask, _ = labelled_training_batch(rng, cfg, batch_size, repeat_only=repeat_only)
    return ids, mask


def labelled_training_batch(
    rng: np.random.Generator, cfg: CorpusConfig, batch_size: int, *, repeat_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """:func:`training_batch` plus each sequence's kind (``"repeat"`` or its family), ``[batch]``.

    Draws exactly what :func:`training_batch` draws from ``rng`` (it is the same code), so a training
    loop may use either and the corpus stays the same.
    """
    ids = torch.full((batch_size, cfg.n_ctx), TOKEN_ID[PAD], dtype=torch.long)
    mask = torch.zeros((batch_size, cfg.n_ctx), dtype=torch.bool)
    kinds: list[str] = []
    shares = np.asarray(cfg.family_shares, dtype=float) / sum(cfg.family_shares)
    max_demos = min(cfg.max_demos, (cfg.n_ctx - 4) // 4)
    for b in range(batch_size):
        if repeat_only or rng.random() < cfg.repeat_share:
            toks = repeated_segment(rng, cfg)
            ids[b, : len(toks)] = torch.tensor(encode(toks))
            mask[b, 1 : len(toks)] = True
            kinds.append("repeat")
            continue
        family = FAMILIES[int(rng.choice(len(FAMILIES), p=shares))]
        ep = sample_episode(rng, cfg, family, int(rng.integers(cfg.min_demos, max_demos + 1)))
        toks = ep.tokens()
        ids[b, : len(toks)] = torch.tensor(encode(toks))
        if family != "bound":  # bound demo labels are fresh draws (distinct keys): unpredictable, not trained on
            for i, flip in enumerate(ep.flipped):
                mask[b, 1 + 4 * i + 2] = not flip  # label position of demo i
        mask[b, len(toks) - 1] = True
        kinds.append(family)
    return ids, mask, tuple(kinds)
