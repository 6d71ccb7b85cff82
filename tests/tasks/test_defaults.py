"""Run sizes per model kind: one table, an explicit argument wins, unknown settings refused."""

from __future__ import annotations

import pytest

from icl_circuits.errors import InputError
from icl_circuits.tasks.defaults import DEFAULTS, KINDS, model_kind, run_default


@pytest.mark.unit
def test_every_kind_lists_the_same_commands_and_settings():
    assert set(DEFAULTS) == set(KINDS)
    assert {c: set(v) for c, v in DEFAULTS["fixture"].items()} == {c: set(v) for c, v in DEFAULTS["language"].items()}


@pytest.mark.unit
def test_every_analysis_but_the_combined_one_has_a_default_n():
    from icl_circuits.analyze import ANALYSES

    for name in ANALYSES:
        if name != "record-vs-circuit":
            assert all("n" in DEFAULTS[kind][name] for kind in KINDS), name


@pytest.mark.fixture
def test_run_default_by_kind_and_given_value_wins(tiny_gpt2):
    assert model_kind(tiny_gpt2) == "language"
    assert run_default(tiny_gpt2, "attribute", "n") == DEFAULTS["language"]["attribute"]["n"]
    assert run_default(tiny_gpt2, "attribute", "n", 3) == 3
    with pytest.raises(InputError, match="no default 'heads' for 'attribute'"):
        run_default(tiny_gpt2, "attribute", "heads")
