"""Default run sizes per model kind, in one place.

Two kinds: ``"fixture"`` -- a model on the fixture corpus's word-level vocabulary (tiny, trained here:
a forward of a batch takes milliseconds) -- and ``"language"`` -- any other model, e.g. SmolLM2-135M
(30 layers, a 49k vocabulary: exact patching, the head-ablation sweeps and the transplant sweep cost
minutes on 2 CPU cores). Every command and analysis reads its defaults (prompts ``n``, demos ``shots``)
from :data:`DEFAULTS` through :func:`run_default`; an explicit argument always wins. The language-model
sizes were chosen so each command finishes in minutes on 2 cores (the README's "On a real model"
section lists the measured times).
"""

from __future__ import annotations

from typing import Any

from icl_circuits.errors import InputError
from icl_circuits.tasks import corpus

KINDS = ("fixture", "language")

#: kind -> command or analysis -> setting -> default value.
DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "fixture": {
        "evaluate": {"n": 100},
        "attribute": {"n": 32, "shots": 8},
        "fast-weights": {"n": 64, "shots": 8, "layer_stride": 1, "n_random": 5},
        "order": {"n": 8, "shots": 5},
        "shots-and-noise": {"n": 64},
        "unseen-task": {"n": 48},
        "repetition": {"n": 64, "shots": 4},
        "label-binding": {"n": 64, "shots": 6, "scan_ablation": True},
        "information-flow": {"n": 32, "shots": 6},
        "head-scan": {"ablation_batch": None},  # None: the sweep uses every scan sequence
    },
    "language": {
        "evaluate": {"n": 40},
        "attribute": {"n": 8, "shots": 4},
        # the transplant sweeps every 3rd layer with 3 random controls: its cost is (layers + 1) x (2 + n_random)
        # forwards of all the task's zero-shot prompts per fold, whatever n (about 4x less than every layer x 5)
        "fast-weights": {"n": 16, "shots": 4, "layer_stride": 3, "n_random": 3},
        "order": {"n": 4, "shots": 4},
        "shots-and-noise": {"n": 24},
        "unseen-task": {"n": 24},
        "repetition": {"n": 16, "shots": 4},
        # the head scan that names the heads to ablate skips its ablation sweep (one resumed forward per head, 270
        # on SmolLM2): the induction role then rests on the induction and copying scores (RoleThresholds)
        "label-binding": {"n": 24, "shots": 4, "scan_ablation": False},
        "information-flow": {"n": 8, "shots": 4},
        # the sweep costs ~ablation_batch forwards of the upper layers per head (README "Measured speed")
        "head-scan": {"ablation_batch": 4},
    },
}


def uses_corpus_vocab(model: Any) -> bool:
    """True when the model's tokenizer is the fixture corpus's word-level vocabulary (``corpus.TOKEN_ID``)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None or int(model.cfg.d_vocab) < len(corpus.VOCAB):
        return False
    try:
        ids = tok.convert_tokens_to_ids(list(corpus.VOCAB))
    except (KeyError, TypeError, ValueError):
        return False
    return list(ids) == [corpus.TOKEN_ID[t] for t in corpus.VOCAB]


def model_kind(model: Any) -> str:
    """``"fixture"`` for models on the fixture vocabulary, else ``"language"``."""
    return "fixture" if uses_corpus_vocab(model) else "language"


def run_default(model: Any, command: str, setting: str, given: Any = None) -> Any:
    """``given`` when not ``None``, else the default ``setting`` of ``command`` for ``model``'s kind.

    Raises:
        InputError: ``command`` or ``setting`` has no default (a bug in the caller).
    """
    if given is not None:
        return given
    table = DEFAULTS[model_kind(model)].get(command, {})
    if setting not in table:
        raise InputError(f"no default {setting!r} for {command!r}; known: {sorted(table)}")
    return table[setting]
