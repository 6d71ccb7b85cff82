"""Tasks, prompts and clean/corrupted pairs: data files, determinism, manipulations, tokenization checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from icl_circuits import PromptTooLongError, TaskError, TokenizationError
from icl_circuits.tasks import corpus
from icl_circuits.tasks.pairs import CORRUPTIONS, patching_batch
from icl_circuits.tasks.prompts import (
    build_prompts,
    check_task,
    continuation_ids,
    encode,
    flip_labels,
    permute_demos,
    repeat_demos,
)
from icl_circuits.tasks.registry import (
    FewShot,
    FixtureTask,
    Pair,
    PairTask,
    SubstitutedTask,
    Template,
    file_tasks,
    get_task,
    load_task_file,
    substitution_map,
)

REQUIRED = [
    "antonym", "country-capital", "english-french", "present-past",
    "lowercase-uppercase", "singular-plural", "word-first-letter", "number-successor",
]  # fmt: skip


@pytest.fixture(scope="session")
def fixture_like(tmp_path_factory):
    """A random 2-layer GPT-2 with the fixtures' tokenizer and corpus.json: the fixture format, untrained."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from fixtures.train import build_tokenizer
    from icl_circuits import load_model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(corpus.VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                     bos_token_id=0, eos_token_id=0, pad_token_id=1)  # fmt: skip
    d = tmp_path_factory.mktemp("fixture_like")
    GPT2LMHeadModel(cfg).save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    (d / "corpus.json").write_text(json.dumps(corpus.CorpusConfig().to_dict()))
    return load_model(str(d), device="cpu")


# ---------------------------------------------------------------- data and registry


def test_task_files_cover_the_required_tasks():
    tasks = file_tasks()
    for name in REQUIRED:
        assert name in tasks, name
        t = tasks[name]
        assert t.size >= 50 and len({p.input for p in t.pairs}) == t.size
    assert tasks["country-capital"].lookup("France") == "Paris"
    assert tasks["number-successor"].lookup("9") == "10"


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"input": "a", "output": "b"}', "expected a JSON list"),
        ('[{"input": "a"}]', "item 0"),
        ('[{"input": "a", "output": ""}, {"input": "b", "output": "c"}]', "item 0"),
        ('[{"input": "a", "output": "b"}, {"input": "a", "output": "c"}]', "'a' appears twice"),
        ('[{"input": "a", "output": "b"}]', "needs at least 2"),
    ],
)
def test_malformed_task_file_names_file_and_problem(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TaskError, match=match) as info:
        load_task_file(path)
    assert "bad.json" in str(info.value)


def test_get_task_names_and_unknown():
    assert isinstance(get_task("fixture-rule-shift12"), FixtureTask)
    assert get_task("fixture-rule-shift12").shift == 12
    sub = get_task("antonym:substituted")
    assert isinstance(sub, SubstitutedTask) and sub.base.name == "antonym"
    with pytest.raises(TaskError, match="unknown task 'no-such-task'.*antonym"):
        get_task("no-such-task")


def test_fixture_tasks_read_the_models_corpus(fixture_like, tmp_path):
    from icl_circuits.tasks.registry import corpus_config_for

    assert corpus_config_for(fixture_like) == corpus.CorpusConfig()
    assert corpus_config_for(None) == corpus.CorpusConfig()


# ---------------------------------------------------------------- prompts


def test_fixture_prompts_match_the_training_format(fixture_like):
    """Same seed -> the same episodes as corpus.sample_episode, tokenized exactly as in training."""
    cfg = corpus.CorpusConfig()
    for family in corpus.FAMILIES:
        ps = build_prompts(fixture_like, FixtureTask(family, cfg), 4, 20, seed=3)
        rng = np.random.default_rng(3)
        for toks, answer in zip(ps.tokens, ps.answer_ids):
            ep = corpus.sample_episode(rng, cfg, family, 4, noise_rate=0.0)
            assert list(toks) == corpus.encode(ep.tokens(with_answer=False))
            assert int(answer) == corpus.TOKEN_ID[ep.answer]
        if family == "bound":
            assert all(p.example.query in p.example.demos for p in ps.prompts)
        else:
            assert all(p.example.query.input not in {d.input for d in p.example.demos} for p in ps.prompts)


def test_prompts_deterministic_and_contrast_differs(fixture_like):
    task = get_task("fixture-rule")
    a, b = build_prompts(fixture_like, task, 3, 10, seed=1), build_prompts(fixture_like, task, 3, 10, seed=1)
    c = build_prompts(fixture_like, task, 3, 10, seed=2)
    assert a.texts == b.texts and a.texts != c.texts
    assert torch.equal(a.answer_ids, b.answer_ids) and bool((a.answer_ids != a.contrast_ids).all())
    for p in a.prompts:  # the contrast is the latest demo label that is not the answer
        assert p.contrast == next(d.output for d in reversed(p.example.demos) if d.output != p.answer)
    noisy = build_prompts(fixture_like, task, 3, 10, seed=1, noise=1 / 3, permute=True)
    assert [p.example.query for p in noisy.prompts] == [p.example.query for p in a.prompts]
    assert all(sum(p.example.flipped) == 1 for p in noisy.prompts)


def test_zero_shot_and_repeat(fixture_like):
    ps = build_prompts(fixture_like, get_task("fixture-bound"), 0, 3, seed=0)
    assert all(len(t) == 3 for t in ps.tokens)  # <bos> q ->
    rep = build_prompts(fixture_like, get_task("fixture-bound"), 2, 3, seed=0, repeat=3)
    assert all(len(t) == 1 + 4 * 6 + 2 for t in rep.tokens)


def test_shots_above_pairs_and_prompt_too_long(fixture_like):
    small = PairTask("small", [Pair(k, v) for k, v in zip("abcde", "fghij")], template=Template(demo_sep=" ; "))
    with pytest.raises(TaskError, match="n_shots=5 needs more pairs than available.*at most 4 shots from 5 pairs"):
        build_prompts(fixture_like, small, 5, 2)
    with pytest.raises(PromptTooLongError, match="67-token prompt, longer than the context.*64"):
        build_prompts(fixture_like, get_task("fixture-rule"), 16, 2)
    with pytest.raises(PromptTooLongError):
        build_prompts(fixture_like, get_task("fixture-rule"), 8, 2, repeat=2)
    with pytest.raises(TaskError, match="n must be a positive integer"):
        build_prompts(fixture_like, small, 1, 0)


def test_substituted_binding_probe(fixture_like):
    ps = build_prompts(fixture_like, get_task("fixture-bound-unseen"), 5, 20, seed=0)
    for p in ps.prompts:
        labels = [d.output for d in p.example.demos]
        assert set(labels) <= set(corpus.UPPER + corpus.DIGITS) and len(set(labels)) == len(labels)
        assert p.example.query in p.example.demos
    # a fixed substitution keeps one label -> symbol map across prompts
    fixed = SubstitutedTask(get_task("fixture-recorded0"), per_prompt=False, query_in_demos=False)
    ps = build_prompts(fixture_like, fixed, 4, 20, seed=0)
    seen: dict[str, str] = {}
    for p in ps.prompts:
        for d in (*p.example.demos, p.example.query):
            assert seen.setdefault(d.input, d.output) == d.output


# ---------------------------------------------------------------- tokenization with a sub-word tokenizer


@pytest.mark.shared
def test_first_token_collisions_dropped_and_counted(aidreams):
    checked = check_task(aidreams, get_task("antonym"))
    assert checked.n_dropped_pairs > 0 and checked.task.size == 67 - checked.n_dropped_pairs
    assert len(set(checked.answer_ids.values())) == len(checked.answer_ids)  # no collision left
    with pytest.raises(TaskError, match="number-successor.*collide at their first token.*aidreams"):
        check_task(aidreams, get_task("number-successor"))


@pytest.mark.shared
def test_answer_token_is_the_first_token_in_context(aidreams):
    ps = build_prompts(aidreams, get_task("word-first-letter"), 3, 10, seed=0)
    for p, toks, a in zip(ps.prompts, ps.tokens, ps.answer_ids):
        full = encode(aidreams, p.text + " " + p.answer)
        assert full[: len(toks)] == list(toks) and full[len(toks)] == int(a)
    assert continuation_ids(aidreams, "cat ->", " dog")[0] != encode(aidreams, " dog")[1]  # dummy-prefix space


# ---------------------------------------------------------------- manipulations (property tests)

words = st.text(alphabet="abcdefgh", min_size=1, max_size=3)


@st.composite
def examples(draw):
    inputs = draw(st.lists(words, min_size=1, max_size=8, unique=True))
    demos = tuple(Pair(x, draw(words)) for x in inputs[:-1])
    return FewShot(demos, Pair(inputs[-1], draw(words)))


@given(ex=examples(), seed=st.integers(0, 2**16), r=st.integers(1, 4), frac=st.floats(0, 1))
@settings(max_examples=200, deadline=None)
def test_manipulations_preserve_what_they_should(ex, seed, r, frac):
    rng = np.random.default_rng(seed)
    perm = permute_demos(ex, rng)
    assert sorted(perm.demos, key=repr) == sorted(ex.demos, key=repr) and perm.query == ex.query
    rep = repeat_demos(ex, r)
    assert rep.demos == ex.demos * r and rep.query == ex.query
    labels = ["a", "b", "c", "zz"]
    flip = flip_labels(ex, frac, labels, rng)
    k = int(round(frac * ex.n_shots))
    assert sum(flip.flipped) == k and flip.query == ex.query
    for old, new, f in zip(ex.demos, flip.demos, flip.flipped):
        assert new.input == old.input
        assert (new.output != old.output and new.output in labels) if f else new == old
    mapping = substitution_map([d.output for d in ex.demos] + [ex.query.output], list("ABCDEFGHIJ"), rng)
    assert len(set(mapping.values())) == len(mapping)  # injective


def test_bad_manipulation_arguments():
    ex = FewShot((Pair("a", "b"),), Pair("c", "d"))
    with pytest.raises(TaskError, match="repeat must be"):
        repeat_demos(ex, 0)
    with pytest.raises(TaskError, match="noise fraction"):
        flip_labels(ex, 1.5, ["x", "y"], np.random.default_rng(0))


# ---------------------------------------------------------------- clean / corrupted pairs


@given(seed=st.integers(0, 2**16), shots=st.integers(1, 10), corruption=st.sampled_from(CORRUPTIONS),
       family=st.sampled_from(corpus.FAMILIES))  # fmt: skip
@settings(max_examples=25, deadline=None)
def test_patching_pairs_align_and_differ_only_where_said(fixture_like, seed, shots, corruption, family):
    shots = max(shots, 2) if corruption == "shuffled_labels" else shots
    pb = patching_batch(fixture_like, FixtureTask(family), shots, 4, seed, corruption=corruption)
    assert pb.clean_tokens.shape == pb.corrupted_tokens.shape == pb.changeable.shape
    n_pos = 1 + 4 * shots + 2
    assert pb.clean_tokens.shape[1] == n_pos and (pb.last_positions == n_pos - 1).all()
    label_pos = torch.zeros(n_pos, dtype=torch.bool)
    label_pos[3 : 4 * shots : 4] = True  # <bos> k -> v ; ...
    demo_block = torch.zeros(n_pos, dtype=torch.bool)
    demo_block[1 : 1 + 4 * shots] = True
    expected = demo_block if corruption == "filler" else label_pos
    assert (pb.changeable == expected).all()
    diff = pb.clean_tokens != pb.corrupted_tokens
    assert not (diff & ~pb.changeable).any() and diff.any(dim=1).all()
    assert (pb.answer_tokens != pb.contrast_tokens).all()
    for clean, bad in zip(pb.clean_tokens, pb.corrupted_tokens):
        if corruption == "shuffled_labels":
            assert sorted(clean[label_pos].tolist()) == sorted(bad[label_pos].tolist())
        if corruption == "filler":
            assert (bad[demo_block] == corpus.TOKEN_ID[corpus.UNK]).all()


def test_shuffled_bound_contrast_is_the_corrupted_answer(fixture_like):
    pb = patching_batch(fixture_like, get_task("fixture-bound"), 6, 8, seed=0)
    for text, bad, c in zip(pb.clean_prompts, pb.corrupted_prompts, pb.contrast_tokens):
        query = text.split()[-2]
        demos = dict(d.split(" -> ") for d in bad.split(" ; ")[:-1])
        assert corpus.TOKEN_ID[demos[query]] == int(c)


def test_patching_errors(fixture_like):
    with pytest.raises(TaskError, match="unknown corruption"):
        patching_batch(fixture_like, get_task("fixture-bound"), 2, 2, corruption="noise")
    with pytest.raises(TaskError, match="needs n_shots >= 1"):
        patching_batch(fixture_like, get_task("fixture-bound"), 0, 2)
    with pytest.raises(TaskError, match="needs n_shots >= 2"):
        patching_batch(fixture_like, get_task("fixture-bound"), 1, 2)
    with pytest.raises(TaskError, match="needs other_task="):
        patching_batch(fixture_like, get_task("antonym"), 2, 2, corruption="other_task_labels")
    same = PairTask("same", [Pair(k, "a") for k in "bcdefg"], template=Template(demo_sep=" ; "))
    with pytest.raises(TaskError, match="'same' has 1 distinct label"):
        patching_batch(fixture_like, same, 3, 2)
    rec = get_task("fixture-recorded0")
    with pytest.raises(TaskError, match="20 examples in a row left unchanged by 'other_task_labels'"):
        patching_batch(fixture_like, rec, 3, 2, corruption="other_task_labels", other_task=rec)


@pytest.mark.shared
def test_patching_with_subword_tokenizer(aidreams):
    task = get_task("word-first-letter")
    for corruption in ("shuffled_labels", "filler"):
        pb = patching_batch(aidreams, task, 4, 6, seed=1, corruption=corruption)
        diff = pb.clean_tokens != pb.corrupted_tokens
        assert not (diff & ~pb.changeable).any() and diff.any(dim=1).all()
    with pytest.raises(TokenizationError, match="filler 'xylophone' is .* tokens; it must be one"):
        patching_batch(aidreams, task, 2, 2, corruption="filler", template=Template(filler="xylophone"))
    other = PairTask("long", [Pair(k, "xylophone") for k in ("p", "q", "r")])
    with pytest.raises(TokenizationError, match="no label of 1 token"):
        patching_batch(aidreams, task, 2, 2, corruption="other_task_labels", other_task=other)


@pytest.fixture(scope="module")
def bpe_gpt2(tmp_path_factory):
    """A random GPT-2 with a byte-level BPE tokenizer (GPT-2's scheme) trained on the task files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from icl_circuits import load_model

    texts = [f"{p.input} -> {p.output}\n" for t in file_tasks().values() for p in t.pairs] * 3
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator(texts, trainer)
    d = tmp_path_factory.mktemp("bpe_gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_inner=32, vocab_size=tk.get_vocab_size(), n_positions=256,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(d)
    eot = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=eot, eos_token=eot).save_pretrained(d)
    return load_model(str(d), device="cpu")


def test_bpe_answers_carry_their_leading_space(bpe_gpt2):
    tok = bpe_gpt2.tokenizer
    ps = build_prompts(bpe_gpt2, get_task("country-capital"), 3, 10, seed=0)
    for p, a in zip(ps.prompts, ps.answer_ids):
        piece = tok.decode([int(a)])
        assert piece.startswith(" ") and (" " + p.answer).startswith(piece)
        assert p.text.endswith(" ->") and "\n" in p.text


def test_bpe_patching_with_multi_token_labels(bpe_gpt2):
    for corruption in CORRUPTIONS:
        other = get_task("antonym") if corruption == "other_task_labels" else None
        pb = patching_batch(bpe_gpt2, get_task("present-past"), 4, 6, seed=2, corruption=corruption, other_task=other)
        diff = pb.clean_tokens != pb.corrupted_tokens
        assert not (diff & ~pb.changeable).any() and diff.any(dim=1).all()
        for clean, bad, last in zip(pb.clean_tokens, pb.corrupted_tokens, pb.last_positions):
            assert (clean[last + 1 :] == bad[last + 1 :]).all()  # padding identical


@torch.no_grad()
def test_fixture_scores_equal_the_direct_corpus_loop(fixture_like):
    """fixtures/properties.py measures through this API: same episodes, same logits as encoding the corpus directly."""
    from fixtures import properties
    from icl_circuits.tasks.scoring import score_prompts

    cfg = corpus.CorpusConfig()
    for family, k in (("bound", 8), ("rule", 2), ("recorded", 1)):
        rng = np.random.default_rng(5)
        eps = [corpus.sample_episode(rng, cfg, family, k, noise_rate=0.0) for _ in range(30)]
        ids = torch.tensor([corpus.encode(e.tokens(with_answer=False)) for e in eps])
        answers = torch.tensor([corpus.TOKEN_ID[e.answer] for e in eps])
        logits = fixture_like(ids)[:, -1]
        ranks = (logits > logits.gather(1, answers[:, None])).sum(-1)
        prompts = build_prompts(fixture_like, FixtureTask(family, cfg), k, 30, 5)
        scores = score_prompts(fixture_like, prompts, batch_size=30)
        assert torch.equal(scores.rank, ranks)
        acc = float((logits.argmax(-1) == answers).float().mean())
        assert properties.family_accuracy(fixture_like, cfg, family, k, n=30, seed=5) == acc
