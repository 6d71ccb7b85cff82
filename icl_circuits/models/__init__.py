"""Getting a model: ``load_model(spec)`` -> a TransformerBridge in compatibility mode.

``loading`` parses specs (fixtures, Hugging Face folders, hub names) and wraps them; ``llama2c``
reads llama2.c checkpoints and tokenizers into Hugging Face Llama weights.
"""

from icl_circuits.models.loading import (
    DEFAULT_MODEL,
    FIXTURE_PREFIX,
    ModelInfo,
    bos_offset,
    describe_fixture,
    fixtures_dir,
    list_fixtures,
    load_model,
    model_info,
    parse_prepend_bos,
    require_tokenizer,
    uses_bos,
)

__all__ = [
    "DEFAULT_MODEL",
    "FIXTURE_PREFIX",
    "ModelInfo",
    "bos_offset",
    "describe_fixture",
    "fixtures_dir",
    "list_fixtures",
    "load_model",
    "model_info",
    "parse_prepend_bos",
    "require_tokenizer",
    "uses_bos",
]
