"""Small random models whose patches matter, shared by the patching tests."""

from __future__ import annotations

import pytest

from icl_circuits import load_model
from tests.patching_models import random_gpt2, random_llama2c


@pytest.fixture(scope="session")
def gqa(tmp_path_factory):
    """2 layers, 4 query heads sharing 2 key/value heads (llama2.c, no tokenizer)."""
    return load_model(str(random_llama2c(tmp_path_factory.mktemp("gqa") / "gqa.bin")), device="cpu")


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory):
    """3 layers x 4 heads, LayerNorm, learned positions."""
    return load_model(str(random_gpt2(tmp_path_factory.mktemp("gpt2"))), device="cpu")
