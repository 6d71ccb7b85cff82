"""Helpers shared by the test modules (not fixtures: those live in the conftest.py files)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
REMOTE_SCRIPT = re.compile(r"<script[^>]+src=[\"']?(https?:)?//", re.IGNORECASE)
ARROW, SEP = 3, 4  # icl_circuits.tasks.corpus token ids of "->" and ";"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail_in_ci(reason: str) -> None:
    """Skip for what this machine may lack (chromium, ../shared/models); in CI (``CI=true``) fail instead."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: CI must provide it)", pytrace=False)
    pytest.skip(reason)


def require_fixture(name: str, file: str = "config.json") -> Path:
    """The folder of a committed fixture; FAILS (never skips) when it is missing: fixtures are part of the repo."""
    folder = FIXTURES / name
    if not (folder / file).is_file():
        pytest.fail(
            f"committed fixture fixtures/{name}/{file} is missing: it is part of the repository "
            f"(restore it with `git checkout -- fixtures/{name}`, or rebuild with `make fixtures`)",
            pytrace=False,
        )
    return folder


def load_fixture(name: str):
    """``fixture:NAME`` loaded on CPU; fails when the committed fixture is missing."""
    from icl_circuits import load_model

    require_fixture(name)
    return load_model(f"fixture:{name}", device="cpu")


def fixture_tokens(batch: int, shots: int, seed: int, vocab: tuple[int, int] = (5, 31)) -> torch.Tensor:
    """``[batch, 1 + 4*shots + 2]`` prompts ``<bos> k -> v ; ... kq ->`` with random keys/labels."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(vocab[0], vocab[1], (batch, 1 + 4 * shots + 2), generator=g)
    t[:, 0] = 0
    for i in range(shots):
        t[:, 2 + 4 * i], t[:, 4 + 4 * i] = ARROW, SEP
    t[:, -1] = ARROW
    return t
