"""Atomic writes, JSON of numpy/torch values, versions and seeded generators (icl_circuits.io)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_circuits.io import atomic_write_json, atomic_write_text, generator, versions

pytestmark = pytest.mark.unit


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "out.txt"
    assert atomic_write_text(path, "first") == path and path.read_text() == "first"
    atomic_write_text(path, "second")
    assert path.read_text() == "second" and sorted(p.name for p in path.parent.iterdir()) == ["out.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # what open() would give, not mkstemp's 0600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(ValueError):  # NaN is refused: the JSON must be standard
        atomic_write_json(path, {"a": float("nan")})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_json_of_numpy_torch_and_paths(tmp_path):
    data = {"i": np.int64(3), "f": np.float32(0.5), "arr": np.arange(3), "t": torch.tensor([[1.0, 2.0]]),
            "p": Path("x/y")}  # fmt: skip
    out = json.loads(atomic_write_json(tmp_path / "d.json", data).read_text())
    assert out == {"i": 3, "f": 0.5, "arr": [0, 1, 2], "t": [[1.0, 2.0]], "p": "x/y"}


def test_generators_are_independent_of_the_global_rng_and_versions_are_read():
    a = torch.randn(4, generator=generator(7))
    torch.manual_seed(123)
    assert torch.equal(torch.randn(4, generator=generator(7)), a)
    assert not torch.equal(torch.randn(4, generator=generator(8)), a)
    v = versions()
    assert v["torch"] == torch.__version__ and set(v) >= {"python", "transformer-lens", "transformers", "numpy"}
