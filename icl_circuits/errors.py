"""The project's exception types: one base class, one subclass per kind of bad input.

Every error names what was wrong (the spec, the file, the task) and, where it can, how to fix it.
They subclass ``ValueError``/``FileNotFoundError`` where that is the natural built-in meaning, so
callers that already catch those keep working.
"""

from __future__ import annotations


class ICLCircuitsError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelSpecError(ICLCircuitsError, ValueError):
    """A model spec that cannot be resolved or loaded (unknown fixture, missing file, hub offline)."""


class CheckpointFormatError(ModelSpecError):
    """A llama2.c checkpoint or tokenizer file whose bytes disagree with the format."""


class NoTokenizerError(ICLCircuitsError):
    """A string method was called on a model loaded without a tokenizer (token ids only)."""


class TaskError(ICLCircuitsError, ValueError):
    """Unknown task, malformed task file, or too few usable pairs."""


class TokenizationError(ICLCircuitsError, ValueError):
    """Answers that tokenize ambiguously, or token sequences whose lengths disagree."""


class PromptTooLongError(ICLCircuitsError, ValueError):
    """A prompt longer than the model's context window."""


class InputError(ICLCircuitsError, ValueError):
    """Any other malformed argument: shapes, ranges, head names."""


class OutputError(ICLCircuitsError, OSError):
    """An output path that cannot be written: an existing file where a folder is needed, a path under a
    file, a read-only or virtual file system. Also an ``OSError`` (``filename`` is the path)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()
