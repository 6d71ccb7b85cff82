"""icl_circuits: mechanistic interpretability of in-context learning on TransformerLens 4."""

import os as _os

# OpenMP threads that busy-wait between parallel regions make torch 16-25x slower when another process
# shares the cores (measured on 2 cores: README "Threads"); sleeping waits cost nothing measurable there.
# Read once when torch loads, so it must precede the first torch import; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from icl_circuits.errors import (
    CheckpointFormatError,
    ICLCircuitsError,
    InputError,
    ModelSpecError,
    NoTokenizerError,
    PromptTooLongError,
    TaskError,
    TokenizationError,
)
from icl_circuits.models import ModelInfo, list_fixtures, load_model, model_info

__version__ = "0.1.0"

__all__ = [
    "CheckpointFormatError",
    "ICLCircuitsError",
    "InputError",
    "ModelInfo",
    "ModelSpecError",
    "NoTokenizerError",
    "PromptTooLongError",
    "TaskError",
    "TokenizationError",
    "__version__",
    "list_fixtures",
    "load_model",
    "model_info",
]
