"""Few-shot tasks: fixed pair lists read from files, and tasks generated per prompt.

A task answers one question: *draw me a few-shot example with ``n_shots`` demos* (``Task.draw``).
Two kinds satisfy it:

* :class:`PairTask` -- a fixed list of ``(input, output)`` pairs, e.g. ``fixtures/tasks/antonym.json``
  (plain JSON ``[{"input": ..., "output": ...}, ...]``, inputs distinct). Demos and the query are
  distinct pairs drawn without replacement, so the query's input is never among the demos.
* :class:`FixtureTask` -- the corpus families the fixture models are trained on
  (:mod:`icl_circuits.tasks.corpus`): ``recorded`` (fixed permutations; query not among the demos),
  ``bound`` (a fresh random binding per prompt; query key among the demos) and ``rule``
  (shift-by-s; query not among the demos; shifts outside ``train_shifts`` are unseen tasks).

:class:`SubstitutedTask` wraps any task and replaces its labels by arbitrary unrelated symbols
(semantically-unrelated labels, Wei et al. 2023). By default the substitution is drawn afresh for
each prompt and the query is one of the demo inputs: the "A -> B, C -> D, A -> ?" probe of binding
new labels in context. Names: ``get_task("antonym:substituted")`` gives the substituted variant of
any registered task.

:class:`ArbitraryMapTask` is a task no pretrained model can have seen: a fixed random function from
one task file's inputs to unrelated labels, drawn once from a seed (``arbitrary-country-word``:
country -> an English word; ``arbitrary-word-symbol``: English word -> a letter or digit). No rule
links input and label, so the only way to answer is to read the query's own pair from the demos: by
default the query is one of the demos (zero shots: accuracy at chance; it rises with shots as far as
the model binds in context). With ``query_in_demos=False`` the query is never among the demos and
accuracy must stay at chance at any number of shots -- the check that the map is unseen.

Every draw takes an explicit ``numpy.random.Generator``; nothing here touches a global RNG.
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from icl_circuits.errors import TaskError
from icl_circuits.tasks import corpus

SUBSTITUTED_SUFFIX = ":substituted"
#: Default symbols for substituted labels: never labels in the fixture corpus, single tokens in most vocabularies.
DEFAULT_SYMBOLS: tuple[str, ...] = corpus.UPPER + corpus.DIGITS


def tasks_dir() -> Path:
    """The task-file folder: ``$ICL_CIRCUITS_TASKS`` or ``fixtures/tasks/`` beside the package."""
    env = os.environ.get("ICL_CIRCUITS_TASKS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "fixtures" / "tasks"


@dataclass(frozen=True)
class Pair:
    """One demonstration or query: ``input -> output``."""

    input: str
    output: str


@dataclass(frozen=True)
class FewShot:
    """A few-shot example before rendering: the demos, the query, and which demo labels were flipped."""

    demos: tuple[Pair, ...]
    query: Pair
    flipped: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        if not self.flipped:
            object.__setattr__(self, "flipped", (False,) * len(self.demos))
        if len(self.flipped) != len(self.demos):
            raise TaskError(f"flipped has {len(self.flipped)} entries for {len(self.demos)} demos")

    @property
    def n_shots(self) -> int:
        return len(self.demos)


@dataclass(frozen=True)
class Template:
    """How a few-shot example becomes text.

    ``prefix + demo_sep.join(input + io_sep + output for demos) + demo_sep + query + io_sep.rstrip()``
    (no ``demo_sep`` when there are no demos). The answer continues the prompt with
    ``io_sep``'s trailing whitespace + output, so a BPE answer carries its leading space
    (``" Paris"``). ``filler`` is the text whose single token replaces the demos in the ``filler``
    corruption. The model's BOS is added at tokenization, never written here.
    """

    prefix: str = ""
    io_sep: str = " -> "
    demo_sep: str = "\n"
    filler: str = "."

    def __post_init__(self) -> None:
        if not self.io_sep.strip():
            raise TaskError(f"template io_sep {self.io_sep!r} must contain a visible separator")

    @property
    def answer_lead(self) -> str:
        """Whitespace between the prompt's end and the answer (``io_sep``'s trailing whitespace)."""
        return self.io_sep[len(self.io_sep.rstrip()) :]

    def render_demo(self, pair: Pair) -> str:
        return f"{pair.input}{self.io_sep}{pair.output}"

    def render_query(self, query_input: str) -> str:
        return f"{query_input}{self.io_sep.rstrip()}"

    def demo_block(self, demos: Sequence[Pair]) -> str:
        """``prefix`` plus the demos and the separator after the last one."""
        return self.prefix + "".join(self.render_demo(d) + self.demo_sep for d in demos)

    def render(self, example: FewShot) -> str:
        """The prompt text, ending at the query's separator (the answer excluded)."""
        return self.demo_block(example.demos) + self.render_query(example.query.input)


#: Default for real language models: ``"cat -> dog\\nhot -> cold\\nbig ->"`` (answer `` small``).
LM_TEMPLATE = Template()
#: The fixture corpus format: ``k1 -> v1 ; k2 -> v2 ; kq ->`` (word-level tokens).
FIXTURE_TEMPLATE = Template(io_sep=" -> ", demo_sep=" ; ", filler="<unk>")


class Task(ABC):
    """A source of few-shot examples. Subclasses set ``name``, ``kind``, ``description``, ``template``."""

    name: str
    kind: str
    description: str
    template: Template

    @property
    @abstractmethod
    def labels(self) -> tuple[str, ...]:
        """Every answer a query may have (distinct, sorted): the label space for noise and contrasts."""

    @property
    @abstractmethod
    def max_shots(self) -> int:
        """The most demos one example can hold."""

    @property
    def size(self) -> int | None:
        """Number of fixed pairs; ``None`` for tasks generated per prompt."""
        return None

    @abstractmethod
    def draw(self, rng: np.random.Generator, n_shots: int) -> FewShot:
        """One example with ``n_shots`` demos (inputs distinct), drawn from ``rng``."""

    @abstractmethod
    def without_labels(self, drop: frozenset[str]) -> Task:
        """The task with every example whose answer is in ``drop`` removed (tokenization filtering)."""

    def lookup(self, x: str) -> str | None:
        """The label of input ``x`` when this task fixes one (``None`` otherwise)."""
        return None

    def check_shots(self, n_shots: int) -> None:
        """Raise :class:`TaskError` unless ``0 <= n_shots <= max_shots``."""
        if not isinstance(n_shots, (int, np.integer)) or n_shots < 0:
            raise TaskError(f"n_shots must be a non-negative integer, got {n_shots!r}")
        if n_shots > self.max_shots:
            raise TaskError(
                f"task {self.name!r}: shots={n_shots} needs more pairs than available "
                f"(at most {self.max_shots} shots{'' if self.size is None else f' from {self.size} pairs'})"
            )

    def __repr__(self) -> str:
        size = "generated" if self.size is None else f"{self.size} pairs"
        return f"{type(self).__name__}({self.name!r}, {size})"


class PairTask(Task):
    """A fixed list of pairs; demos and query are distinct pairs (the query never among the demos)."""

    kind = "pairs"

    def __init__(
        self, name: str, pairs: Sequence[Pair], *, description: str = "", template: Template = LM_TEMPLATE
    ) -> None:
        if len(pairs) < 2:
            raise TaskError(f"task {name!r} has {len(pairs)} pair(s); a few-shot task needs at least 2")
        seen: dict[str, str] = {}
        for p in pairs:
            if p.input in seen:
                raise TaskError(f"task {name!r}: input {p.input!r} appears twice")
            seen[p.input] = p.output
        self.name, self.pairs, self.template = name, tuple(pairs), template
        self.description = description or f"{len(pairs)} input -> output pairs"
        self._map = seen

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted(set(self._map.values())))

    @property
    def max_shots(self) -> int:
        return len(self.pairs) - 1

    @property
    def size(self) -> int:
        return len(self.pairs)

    def draw(self, rng: np.random.Generator, n_shots: int) -> FewShot:
        self.check_shots(n_shots)
        idx = rng.choice(len(self.pairs), size=n_shots + 1, replace=False)
        return FewShot(tuple(self.pairs[int(i)] for i in idx[:-1]), self.pairs[int(idx[-1])])

    def without_labels(self, drop: frozenset[str]) -> PairTask:
        kept = [p for p in self.pairs if p.output not in drop]
        if len(kept) < 2:
            raise TaskError(
                f"task {self.name!r}: only {len(kept)} of {len(self.pairs)} pairs left after dropping "
                f"{len(self.pairs) - len(kept)} whose answers collide at their first token"
            )
        return PairTask(self.name, kept, description=self.description, template=self.template)

    def lookup(self, x: str) -> str | None:
        return self._map.get(x)


@dataclass(frozen=True, eq=False)
class FixtureTask(Task):
    """A fixture corpus family (``recorded``, ``bound``, ``rule``), generated per prompt, demo labels clean.

    ``shift`` fixes the rule's shift (default: drawn from ``cfg.train_shifts`` per prompt);
    ``recorded`` fixes which recorded permutation (default: drawn per prompt).
    """

    family: str
    cfg: corpus.CorpusConfig = field(default_factory=corpus.CorpusConfig)
    shift: int | None = None
    recorded: int | None = None
    name: str = ""
    description: str = ""
    template: Template = FIXTURE_TEMPLATE
    kind: str = "generated"

    def __post_init__(self) -> None:
        if self.family not in corpus.FAMILIES:
            raise TaskError(f"unknown fixture family {self.family!r}; one of {corpus.FAMILIES}")
        if self.recorded is not None and not 0 <= self.recorded < self.cfg.n_recorded:
            raise TaskError(f"recorded map {self.recorded} out of range 0..{self.cfg.n_recorded - 1}")
        if not self.name:
            suffix = {"rule": "" if self.shift is None else f"-shift{self.shift}"}.get(self.family, "")
            if self.family == "recorded" and self.recorded is not None:
                suffix = str(self.recorded)
            object.__setattr__(self, "name", f"fixture-{self.family}{suffix}")

    @property
    def labels(self) -> tuple[str, ...]:
        return corpus.LETTERS

    @property
    def max_shots(self) -> int:
        return len(corpus.LETTERS) - 1

    def _mapping(self) -> dict[str, str] | None:
        if self.family == "rule" and self.shift is not None:
            return corpus.shift_map(self.shift)
        if self.family == "recorded" and self.recorded is not None:
            return corpus.recorded_maps(self.cfg)[self.recorded]
        return None

    def draw(self, rng: np.random.Generator, n_shots: int) -> FewShot:
        self.check_shots(n_shots)
        mapping = self._mapping()
        ep = corpus.sample_episode(
            rng, self.cfg, self.family, int(n_shots), shift=self.shift, mapping=mapping,
            mapping_name=self.name if mapping else None, noise_rate=0.0,
        )  # fmt: skip
        return FewShot(tuple(Pair(k, v) for k, v in ep.demos), Pair(ep.query, ep.answer))

    def without_labels(self, drop: frozenset[str]) -> FixtureTask:
        if drop & set(self.labels):
            raise TaskError(
                f"task {self.name!r} generates every label in a..z, but {sorted(drop)} collide at their "
                "first token with this tokenizer; use a fixture model or a pair task"
            )
        return self

    def lookup(self, x: str) -> str | None:
        mapping = self._mapping()
        return None if mapping is None else mapping.get(x)


class SubstitutedTask(Task):
    """``base`` with its labels replaced by unrelated ``symbols`` (Wei et al. 2023).

    ``per_prompt=True`` draws a fresh injective label -> symbol map for every prompt (only the
    context can tell); ``False`` fixes one map for the task from ``map_seed``. ``query_in_demos``
    makes the query one of the demos (re-drawn from them), so the substituted answer is in context.
    """

    kind = "substituted"

    def __init__(
        self,
        base: Task,
        symbols: Sequence[str] = DEFAULT_SYMBOLS,
        *,
        per_prompt: bool = True,
        query_in_demos: bool = True,
        map_seed: int = 0,
        name: str | None = None,
        _fixed_map: dict[str, str] | None = None,
    ) -> None:
        symbols = tuple(dict.fromkeys(symbols))
        if len(symbols) < 2:
            raise TaskError(f"substituted labels need at least 2 distinct symbols, got {list(symbols)}")
        self.base, self.symbols, self.per_prompt, self.query_in_demos = base, symbols, per_prompt, query_in_demos
        self.map_seed = map_seed
        self.name = name or base.name + SUBSTITUTED_SUFFIX
        self.template = base.template
        self.description = f"{base.name} with labels replaced by arbitrary symbols" + (
            ", bound afresh per prompt, query among the demos" if per_prompt and query_in_demos else ""
        )
        self._fixed: dict[str, str] | None = _fixed_map
        if not per_prompt and _fixed_map is None:
            if len(base.labels) > len(symbols):
                raise TaskError(
                    f"task {self.name!r}: {len(base.labels)} labels need as many symbols, got {len(symbols)}"
                )
            chosen = np.random.default_rng(map_seed).permutation(len(symbols))[: len(base.labels)]
            self._fixed = {lab: symbols[int(j)] for lab, j in zip(base.labels, chosen)}

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(sorted(self._fixed.values() if self._fixed else self.symbols))

    @property
    def max_shots(self) -> int:
        cap = self.base.max_shots
        return min(cap, len(self.symbols) - 1) if self.per_prompt else cap

    @property
    def size(self) -> int | None:
        return self.base.size

    def draw(self, rng: np.random.Generator, n_shots: int) -> FewShot:
        self.check_shots(n_shots)
        ex = self.base.draw(rng, n_shots)
        demos = ex.demos
        query = ex.query
        if self.query_in_demos and demos:
            query = demos[int(rng.integers(len(demos)))]
        mapping = self._fixed or substitution_map([*(d.output for d in demos), query.output], self.symbols, rng)
        return FewShot(
            tuple(Pair(d.input, mapping[d.output]) for d in demos), Pair(query.input, mapping[query.output])
        )

    def without_labels(self, drop: frozenset[str]) -> SubstitutedTask:
        if self._fixed is not None:
            base = self.base.without_labels(frozenset(k for k, v in self._fixed.items() if v in drop))
            fixed = {k: v for k, v in self._fixed.items() if v not in drop}
            return SubstitutedTask(base, self.symbols, per_prompt=False, query_in_demos=self.query_in_demos,
                                   name=self.name, _fixed_map=fixed)  # fmt: skip
        kept = [s for s in self.symbols if s not in drop]
        if len(kept) < 2:
            raise TaskError(f"task {self.name!r}: only {len(kept)} symbols left after dropping colliding ones")
        return SubstitutedTask(self.base, kept, query_in_demos=self.query_in_demos, name=self.name)

    def lookup(self, x: str) -> str | None:
        y = self.base.lookup(x)
        return None if self._fixed is None or y is None else self._fixed.get(y)


class ArbitraryMapTask(PairTask):
    """Pairs ``input -> f(input)`` with ``f`` a random function fixed by ``map_seed`` (module doc).

    ``inputs`` are kept in order; ``labels`` are drawn without replacement when there are at least as
    many as inputs (an injective map), else with replacement. ``query_in_demos``: the query is one of
    the demos (re-drawn among them) whenever there is at least one demo.
    """

    kind = "arbitrary"

    def __init__(
        self,
        name: str,
        inputs: Sequence[str],
        labels: Sequence[str],
        *,
        map_seed: int = 0,
        query_in_demos: bool = True,
        description: str = "",
        template: Template = LM_TEMPLATE,
        _pairs: Sequence[Pair] | None = None,
    ) -> None:
        if _pairs is None:
            inputs, pool = list(dict.fromkeys(inputs)), list(dict.fromkeys(labels))
            if len(pool) < 2:
                raise TaskError(f"task {name!r} needs at least 2 distinct labels, got {pool}")
            rng = np.random.default_rng(map_seed)
            idx = rng.choice(len(pool), size=len(inputs), replace=len(pool) < len(inputs))
            _pairs = [Pair(x, pool[int(j)]) for x, j in zip(inputs, idx)]
        self.map_seed, self.query_in_demos = map_seed, query_in_demos
        where = "the query among the demos" if query_in_demos else "the query never among the demos"
        description = description or f"{len(_pairs)} arbitrary pairs (seed {map_seed}), {where}"
        super().__init__(name, _pairs, template=template, description=description)

    @property
    def max_shots(self) -> int:
        return len(self.pairs) if self.query_in_demos else len(self.pairs) - 1

    def draw(self, rng: np.random.Generator, n_shots: int) -> FewShot:
        if not self.query_in_demos or n_shots == 0:
            return super().draw(rng, n_shots)
        self.check_shots(n_shots)
        demos = tuple(self.pairs[int(i)] for i in rng.choice(len(self.pairs), size=n_shots, replace=False))
        return FewShot(demos, demos[int(rng.integers(n_shots))])

    def without_labels(self, drop: frozenset[str]) -> ArbitraryMapTask:
        kept = [p for p in self.pairs if p.output not in drop]
        if len(kept) < 2:
            raise TaskError(f"task {self.name!r}: only {len(kept)} of {len(self.pairs)} pairs left after dropping "
                            "labels that collide at their first token")  # fmt: skip
        return ArbitraryMapTask(self.name, [], [], map_seed=self.map_seed, query_in_demos=self.query_in_demos,
                                description=self.description, template=self.template, _pairs=kept)  # fmt: skip

    def with_query_in_demos(self, query_in_demos: bool) -> ArbitraryMapTask:
        """The same map with the query among the demos or never among them (the unseen-map control)."""
        return ArbitraryMapTask(self.name, [], [], map_seed=self.map_seed, query_in_demos=query_in_demos,
                                template=self.template, _pairs=self.pairs)  # fmt: skip


def arbitrary_tasks(files: dict[str, PairTask], map_seed: int = 0) -> dict[str, ArbitraryMapTask]:
    """The unseen tasks, built from the task files ``files`` (the ones they need must be present):
    ``arbitrary-country-word`` (country-capital's inputs -> antonym's words) and ``arbitrary-word-symbol``
    (antonym's inputs -> A..Z, 0..9)."""
    out: list[ArbitraryMapTask] = []
    if "country-capital" in files and "antonym" in files:
        words = [w for p in files["antonym"].pairs for w in (p.input, p.output)]
        out.append(ArbitraryMapTask(
            "arbitrary-country-word", [p.input for p in files["country-capital"].pairs], words, map_seed=map_seed,
            description=f"country -> an unrelated English word, a random map (seed {map_seed}); query among the demos",
        ))  # fmt: skip
    if "antonym" in files:
        out.append(ArbitraryMapTask(
            "arbitrary-word-symbol", [p.input for p in files["antonym"].pairs], DEFAULT_SYMBOLS, map_seed=map_seed,
            description=f"English word -> a letter or digit, a random map (seed {map_seed}); query among the demos",
        ))  # fmt: skip
    return {t.name: t for t in out}


#: The registered tasks that no model can have seen in training (their labels are a seeded random map).
UNSEEN_TASKS: tuple[str, ...] = ("arbitrary-country-word", "arbitrary-word-symbol")


def substitution_map(labels: Sequence[str], symbols: Sequence[str], rng: np.random.Generator) -> dict[str, str]:
    """An injective map of the distinct ``labels`` onto randomly chosen distinct ``symbols``."""
    distinct = list(dict.fromkeys(labels))
    if len(distinct) > len(symbols):
        raise TaskError(f"{len(distinct)} distinct labels but only {len(symbols)} symbols to substitute them")
    chosen = rng.choice(len(symbols), size=len(distinct), replace=False)
    return {lab: symbols[int(j)] for lab, j in zip(distinct, chosen)}


def load_task_file(
    path: str | os.PathLike[str], *, name: str | None = None, template: Template = LM_TEMPLATE
) -> PairTask:
    """Read a task file: a JSON list of ``{"input": str, "output": str}`` objects (inputs distinct).

    Raises:
        TaskError: naming the file and what is malformed (not JSON, wrong shape, empty strings,
            duplicate inputs, fewer than 2 pairs).
    """
    path = Path(path)
    name = name or path.stem
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise TaskError(f"task file {str(path)!r} not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"task file {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(data, list):
        raise TaskError(f'task file {str(path)!r}: expected a JSON list of {{"input", "output"}} objects')
    pairs = []
    for i, item in enumerate(data):
        ok = isinstance(item, dict) and set(item) == {"input", "output"}
        ok = ok and all(isinstance(item[k], str) and item[k].strip() for k in ("input", "output"))
        if not ok:
            raise TaskError(
                f'task file {str(path)!r}: item {i} is {item!r}; each item must be {{"input": str, "output": str}}'
                " with non-empty strings"
            )
        pairs.append(Pair(item["input"], item["output"]))
    try:
        return PairTask(name, pairs, description=f"pairs from {path.name}", template=template)
    except TaskError as e:
        raise TaskError(f"task file {str(path)!r}: {e}") from e


def fixture_tasks(cfg: corpus.CorpusConfig | None = None) -> dict[str, Task]:
    """The generated fixture tasks for corpus ``cfg`` (default: ``CorpusConfig()``)."""
    cfg = cfg or corpus.CorpusConfig()
    shifts = f"{min(cfg.train_shifts)}..{max(cfg.train_shifts)}"
    out: list[Task] = [
        FixtureTask("bound", cfg, description="fresh random binding a..z per prompt; query key among the demos"),
        FixtureTask("rule", cfg, description=f"shift-by-s, s in {shifts} per prompt; query key not among the demos"),
        FixtureTask("recorded", cfg, description="one of the recorded permutations per prompt; query not in demos"),
    ]
    out += [FixtureTask("recorded", cfg, recorded=j, description=f"recorded permutation {j}")
            for j in range(cfg.n_recorded)]  # fmt: skip
    for s in range(1, 9):
        seen = "trained" if s in cfg.train_shifts else "held out (unseen task)"
        out.append(FixtureTask("rule", cfg, shift=s, description=f"shift by {s}, {seen}"))
    bound = out[0]
    out.append(SubstitutedTask(bound, DEFAULT_SYMBOLS, name="fixture-bound-unseen"))
    out[-1].description = "A -> B, C -> D, A -> ?: bound task with labels A..Z 0..9, never labels in training"
    return {t.name: t for t in out}


def file_tasks(folder: str | os.PathLike[str] | None = None) -> dict[str, PairTask]:
    """Every ``*.json`` task file of ``folder`` (default :func:`tasks_dir`), by file stem."""
    root = Path(folder) if folder is not None else tasks_dir()
    return {p.stem: load_task_file(p) for p in sorted(root.glob("*.json"))} if root.is_dir() else {}


def corpus_config_for(model: Any) -> corpus.CorpusConfig:
    """The corpus a fixture model was trained on (its folder's ``corpus.json``), else the defaults."""
    from icl_circuits.models import FIXTURE_PREFIX, fixtures_dir, model_info

    if model is None:
        return corpus.CorpusConfig()
    info = model_info(model)
    folder = fixtures_dir() / info.spec[len(FIXTURE_PREFIX) :] if info.kind == "fixture" else Path(info.spec)
    path = folder / "corpus.json"
    if info.kind in ("fixture", "hf_dir") and path.is_file():
        return corpus.CorpusConfig.from_dict(json.loads(path.read_text()))
    return corpus.CorpusConfig()


def all_tasks(model: Any = None) -> dict[str, Task]:
    """Every registered task: the task files, the arbitrary-map (unseen) tasks built from them, then the
    fixture tasks (for ``model``'s corpus)."""
    files = file_tasks()
    return {**files, **arbitrary_tasks(files), **fixture_tasks(corpus_config_for(model))}


_SHIFT = re.compile(r"fixture-rule-shift(\d+)")


def get_task(name: str | Task, model: Any = None) -> Task:
    """The task called ``name``; ``NAME:substituted`` for its label-substituted variant;
    ``fixture-rule-shiftN`` for any shift N; a path to a ``.json`` file for a task file; a :class:`Task`
    is returned as it is (so every function taking a task accepts a name or a ``Task``).

    Raises:
        TaskError: for an unknown name, listing the known ones.
    """
    if isinstance(name, Task):
        return name
    if not isinstance(name, str):
        raise TaskError(f"a task is a name or a Task, got {type(name).__name__}")
    if name.endswith(SUBSTITUTED_SUFFIX):
        return SubstitutedTask(get_task(name[: -len(SUBSTITUTED_SUFFIX)], model))
    if name.endswith(".json") and Path(name).is_file():
        return load_task_file(name)
    known = all_tasks(model)
    if name in known:
        return known[name]
    m = _SHIFT.fullmatch(name)
    if m and 1 <= int(m.group(1)) < len(corpus.LETTERS):
        return FixtureTask("rule", corpus_config_for(model), shift=int(m.group(1)))
    raise TaskError(f"unknown task {name!r}; known: {', '.join(known)} (and NAME{SUBSTITUTED_SUFFIX})")
