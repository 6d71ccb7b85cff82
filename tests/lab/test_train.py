"""The lab trainer: determinism, atomic checkpoints, exact resume after an interrupt, loadable checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import icl_circuits.lab.train as lt
from icl_circuits import InputError, load_model
from icl_circuits.lab.config import LabConfig, load_config
from icl_circuits.tasks.corpus import CorpusConfig

pytestmark = pytest.mark.fixture

TINY = LabConfig(name="tiny", n_layer=2, n_head=2, n_embd=16, n_inner=4, attn_only=True, steps=12, batch_size=8,
                 warmup=2, checkpoint_every=4, corpus=CorpusConfig(repeat_share=0.5))  # fmt: skip


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def threads_back():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_two_runs_are_bit_identical_and_an_interrupted_run_resumes_exactly(tmp_path, monkeypatch, threads_back):
    a = lt.train(TINY, tmp_path / "a", threads=1, progress=False)
    b = lt.train(TINY, tmp_path / "b", threads=1, progress=False)
    assert [s for s, _ in a.checkpoints] == [0, 4, 8, 12]
    assert same(weights(a.checkpoints[-1][1]), weights(b.checkpoints[-1][1]))
    assert not same(weights(a.checkpoints[0][1]), weights(a.checkpoints[-1][1]))  # it did train

    real, calls = lt.corpus.labelled_training_batch, []

    def interrupt_at_step_7(*args, **kw):  # Ctrl-C while step 7 draws its batch
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(lt.corpus, "labelled_training_batch", interrupt_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        lt.train(TINY, tmp_path / "c", threads=1, progress=False)
    monkeypatch.setattr(lt.corpus, "labelled_training_batch", real)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == ["lab_config.json", "step-000000", "step-000004", "train_log.jsonl"]  # no temp folder left
    assert load_model(str(tmp_path / "c" / "step-000004"), device="cpu").cfg.n_layers == 2  # usable
    c = lt.train(TINY, tmp_path / "c", threads=1, progress=False, resume=True)
    assert c.resumed_from == 4
    for (sa, fa), (sc, fc) in zip(a.checkpoints, c.checkpoints):
        assert sa == sc and same(weights(fa), weights(fc)), sa
    assert [r["step"] for r in c.log] == list(range(1, 13))
    assert [r["loss"] for r in c.log] == [r["loss"] for r in a.log]
    assert set(c.log[0]["loss_by_kind"]) <= set(lt.KINDS) and sum(c.log[0]["n_by_kind"].values()) == 8
    record = json.loads((tmp_path / "c" / "step-000012" / "training_record.json").read_text())
    assert record["threads"] == 1 and record["step"] == 12


def test_attention_only_mlps_stay_zero_and_a_run_is_not_restarted_by_mistake(tmp_path, threads_back):
    run = lt.train(TINY, tmp_path / "r", threads=1, progress=False)
    w = weights(run.checkpoints[-1][1])
    assert all(not w[k].any() for k in w if ".mlp.c_proj." in k)
    with pytest.raises(InputError, match="already holds a training run"):
        lt.train(TINY, tmp_path / "r", threads=1, progress=False)
    with pytest.raises(InputError, match="another config"):
        lt.train(TINY.with_overrides({"lr": 0.5}), tmp_path / "r", resume=True, progress=False)


@pytest.mark.unit
def test_config_files_are_checked(tmp_path):
    good = tmp_path / "c.toml"
    good.write_text('name = "x"\nsteps = 10\n[corpus]\nrepeat_share = 1.0\n')
    cfg = load_config(good, seed=3)
    assert (cfg.steps, cfg.seed, cfg.corpus.repeat_share) == (10, 3, 1.0)
    assert cfg.checkpoint_steps() == [0, 10]
    for text, match in (('stesp = 10\n', "did you mean 'steps'"), ("steps = 0\n", "steps must be an integer >= 1"),
                        ("[corpus]\nrepeat_share = 2.0\n", "repeat_share"),
                        ("[corpus]\nzipf_exponent = -1\n", "zipf_exponent"), ("steps = [\n", "not valid TOML")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(InputError, match=match):
            load_config(bad)
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.toml")
