"""The README's "From Python" block runs as written (on the embedded fixture)."""

from __future__ import annotations

import os
import re

import pytest

from tests.helpers import ROOT, require_fixture

pytestmark = pytest.mark.fixture


def readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- from-python:begin -->\n```python\n(.*?)```\n<!-- from-python:end -->", text, re.S)
    assert m, "README.md has no from-python block"
    return m.group(1)


def test_readme_from_python_block_runs(tmp_path, monkeypatch, capsys):
    require_fixture("icl-tiny")
    monkeypatch.chdir(tmp_path)  # its out/python goes to a temporary folder
    code = readme_python_block()
    namespace: dict[str, object] = {}
    exec(compile(code, "README.md:from-python", "exec"), namespace)  # noqa: S102 - the README's own code
    printed = capsys.readouterr().out
    assert "induction heads" in printed and "accuracy" in printed
    assert os.path.isfile(tmp_path / "out/python/shots_and_noise.json")
    assert os.path.isfile(tmp_path / "out/python/shots_and_noise.html")
    assert type(namespace["fig"]).__name__ == "Figure"
