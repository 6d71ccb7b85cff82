"""The trained induction fixture shared by the attribution tests."""

from __future__ import annotations

import pytest

from tests.helpers import load_fixture


@pytest.fixture(scope="session")
def ind2l():
    return load_fixture("induction-2l")
