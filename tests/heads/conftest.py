"""Models shared by the head tests."""

from __future__ import annotations

import pytest

from icl_circuits import load_model
from tests.helpers import load_fixture
from tests.llama2c_reference import random_checkpoint


@pytest.fixture(scope="session")
def gqa_model(tmp_path_factory):
    """A random llama2.c checkpoint, 4 query heads sharing 2 key/value heads, loaded without a tokenizer."""
    path = random_checkpoint(tmp_path_factory.mktemp("gqa") / "gqa.bin", L=3, n_kv=2, seq_len=40)
    return load_model(str(path), device="cpu")


@pytest.fixture(scope="session")
def induction_2l():
    return load_fixture("induction-2l")
