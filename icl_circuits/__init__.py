"""icl_circuits: mechanistic interpretability of in-context learning on TransformerLens 4."""

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
