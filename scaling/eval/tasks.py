"""Downstream tasks: each a list of examples built deterministically from (seed, k shots), in a registry by name.

An example is multiple choice (context, choices, gold index: scored by the log-likelihood of each choice) or exact
match (context, target string: scored by greedy decoding). Example i is drawn from `default_rng([seed, i, task])`,
so `limit=50` gives the first 50 of `limit=200`, and a seed gives the same prompts on every machine.

The OFFLINE SUITE ships with the package: built from the run's own held-out documents (or from nothing), it needs no
network. Chance is what a scorer that ignores the context gets in expectation (why, per task, in its docstring):

| task        | kind  | how it is built                                                                       | chance        |
|-------------|-------|---------------------------------------------------------------------------------------|---------------|
| `cloze`     | mc    | next word after ~200 characters of a HELD-OUT document, vs 3 words drawn from the     | 1/4           |
|             |       | same documents (all four drawn alike, so only the context tells them apart)           |               |
| `spelling`  | mc    | a held-out word (5+ letters) after its context vs 3 misspellings swapping two adjacent | 1/4           |
|             |       | letters, of equal token count (lexical minimal pairs, as BLiMP, Warstadt et al. 2020)  |               |
| `kv_recall` | mc    | `a:7 q:3 z:9 d:1 q:` -> `3`, among the 4 values present (Olsson et al. 2022)          | 1/4           |
| `copy`      | exact | 5 random words, then the first j of them again: the next word (induction)              | 1/256         |
| `pattern`   | mc    | k = 3 shown examples of one rule (`abc -> cba`; `17 -> 18`), the rule's output among    | 1/4           |
|             |       | the 4 rules' outputs for the query                                                    |               |

Real benchmarks through HF `datasets` (network on first use, then its cache): `hellaswag`, `lambada` (exact: the
last word, as LAMBADA is scored), `arc_easy`, `piqa`; their chance is the mean of 1 / number of choices.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from scaling.paths import cache_root

KINDS = ("mc", "exact")


@dataclass(frozen=True)
class Example:
    context: str
    choices: tuple[str, ...] = ()  # mc: the continuations to score
    gold: int = 0  # mc: index of the right choice
    target: Optional[str] = None  # exact: the continuation greedy decoding must produce
    shots: tuple[str, ...] = ()  # solved demonstrations, placed before the context
    sep: str = "\n\n"  # between shots and context

    @property
    def kind(self) -> str:
        return "exact" if self.target is not None else "mc"

    @property
    def answer(self) -> str:
        return self.target if self.target is not None else self.choices[self.gold]

    @property
    def continuations(self) -> tuple[str, ...]:
        return (self.target,) if self.target is not None else self.choices

    def prompt(self, n_shots: Optional[int] = None) -> str:
        """The text before the continuation, with the last `n_shots` demonstrations (default: all)."""
        shots = self.shots if n_shots is None else self.shots[len(self.shots) - n_shots:]
        return self.sep.join((*shots, self.context))

    def solved(self) -> str:
        """As a demonstration: the context and its answer."""
        return self.context + self.answer


@dataclass(frozen=True)
class Task:
    name: str
    kind: str
    examples: tuple[Example, ...]
    k: int
    seed: int
    chance: float
    tokenizer: Optional[str] = None  # identity of the tokenizer whose held-out documents the task was built from


class HeldOut:
    """The held-out (validation) documents of a run's data, as text: what `cloze` and `copy` are built from."""

    def __init__(self, documents: list[str], tokenizer: Optional[str] = None,
                 encode: Optional[Callable[[str], list[int]]] = None) -> None:
        self.documents = [d for d in documents if d.strip()]
        self.tokenizer = tokenizer
        self.encode = encode  # the run's tokenizer: `spelling` keeps only choices of the right word's token count

    @classmethod
    def from_tokens(cls, data: Any) -> "HeldOut":
        """The validation split of a `scaling.data.tokens.TokenData`, decoded and cut at its end-of-text tokens."""
        tok = data.tokenizer
        if tok.kind == "synthetic":
            raise ValueError("the run was trained on data.source=synthetic, which has no text: the evaluation tasks "
                             "are text; evaluate runs trained on text (data.source=embedded, local or hf)")
        val = np.asarray(data.val)
        cuts = np.flatnonzero(val == tok.eot)
        docs = [tok.decode(piece) for piece in np.split(val, cuts) if len(piece)]
        return cls([d.replace("<|endoftext|>", "") for d in docs], tok.identity, tok.encode)

    @functools.cached_property
    def word_spans(self) -> list[tuple[int, int, int]]:
        """(document, start of the space before the word, end) of every alphabetic word preceded by a space."""
        return [(d, m.start(), m.end()) for d, doc in enumerate(self.documents)
                for m in _WORD.finditer(doc) if m.start() >= CLOZE_MIN_CONTEXT]

    @functools.cached_property
    def long_word_spans(self) -> list[tuple[int, int, int]]:
        """The word spans of SPELLING_MIN_LETTERS+ letters."""
        return [(d, s, e) for d, s, e in self.word_spans if e - s - 1 >= SPELLING_MIN_LETTERS]

    @functools.cached_property
    def common_words(self) -> list[str]:
        counts = Counter(w.lower() for doc in self.documents for w in re.findall(r"[A-Za-z]{3,}", doc))
        return [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


_WORD = re.compile(r" [A-Za-z]+\b")


# --------------------------------------------------------------------------------------------------------------------
# The offline suite
# --------------------------------------------------------------------------------------------------------------------
CLOZE_CHOICES = 4
CLOZE_CONTEXT = 200  # characters of the document before the word (left-truncated further to the model's seq_len)
CLOZE_MIN_CONTEXT = 40
KV_PAIRS = 4
SPELLING_CHOICES = 4
SPELLING_MIN_LETTERS = 5
COPY_WORDS = 5
COPY_POOL = 256
PATTERN_RULES = 4


def draw_cloze(src: HeldOut, rng: np.random.Generator) -> Example:
    """The word that follows ~CLOZE_CONTEXT characters of a held-out document, among CLOZE_CHOICES words.

    All choices are word occurrences drawn uniformly from the same documents (the right one defines the context), and a
    draw with a repeated word (ignoring case) is redrawn whole: the choices are exchangeable, so any scorer that ignores
    the context (a random model, unigram frequencies, choice length) is right with probability exactly 1/CLOZE_CHOICES.
    """
    spans = src.word_spans
    if len(spans) < 10 * CLOZE_CHOICES:
        raise ValueError(f"the held-out documents hold {len(spans)} usable words, too few for cloze (need "
                         f"{10 * CLOZE_CHOICES}): raise data.val_fraction or use a larger corpus")
    while True:
        picks = [spans[i] for i in rng.integers(0, len(spans), CLOZE_CHOICES)]
        words = [src.documents[d][s:e] for d, s, e in picks]
        if len({w.lower() for w in words}) == CLOZE_CHOICES:
            break
    d, s, _ = picks[0]
    gold = int(rng.integers(CLOZE_CHOICES))
    words[0], words[gold] = words[gold], words[0]
    return Example(_cloze_context(src, d, s), tuple(words), gold)


def _cloze_context(src: HeldOut, d: int, s: int) -> str:
    """Up to CLOZE_CONTEXT characters of document d before position s, starting at a word."""
    context = src.documents[d][max(0, s - CLOZE_CONTEXT):s]
    if s > CLOZE_CONTEXT and " " in context:
        context = context[context.index(" ") + 1:]
    return context


def _transpositions(word: str) -> list[str]:
    """The distinct misspellings of `word` that swap two adjacent letters after the first (the first keeps its case)."""
    out: list[str] = []
    for i in range(1, len(word) - 1):
        v = word[:i] + word[i + 1] + word[i] + word[i + 2:]
        if v != word and v not in out:
            out.append(v)
    return out


def draw_spelling(src: HeldOut, rng: np.random.Generator) -> Example:
    """A held-out word of SPELLING_MIN_LETTERS+ letters after its context (as cloze), among SPELLING_CHOICES - 1
    misspellings that swap two adjacent letters: a lexical minimal pair in the manner of BLiMP (Warstadt et al. 2020).

    Every choice has the same letters and length, and (with the run's tokenizer known) the same number of tokens, so
    a scorer that knows no English spelling -- a random model, letter or token-count statistics -- is right with
    probability 1/SPELLING_CHOICES (the gold position is uniform). Character n-gram knowledge climbs it, which is why
    models of 1e3-1e5 parameters leave chance on it where cloze's word choice needs far more."""
    spans = src.long_word_spans
    if len(spans) < 10:
        raise ValueError(f"the held-out documents hold {len(spans)} words of {SPELLING_MIN_LETTERS}+ letters, too few "
                         "for spelling (need 10): raise data.val_fraction or use a larger corpus")
    for _ in range(1000):
        d, s, e = spans[int(rng.integers(len(spans)))]
        word = src.documents[d][s:e]  # with its leading space
        variants = [" " + v for v in _transpositions(word[1:])]
        if src.encode is not None:  # equal token counts: a context-free scorer cannot prefer the shorter encoding
            n = len(src.encode(word))
            variants = [v for v in variants if len(src.encode(v)) == n]
        if len(variants) >= SPELLING_CHOICES - 1:
            break
    else:
        raise ValueError("spelling: no held-out word has enough misspellings of its own token count under this "
                         "tokenizer in 1000 draws; use a byte-level tokenizer or a larger corpus")
    choices = [word] + [variants[i] for i in rng.choice(len(variants), SPELLING_CHOICES - 1, replace=False)]
    gold = int(rng.integers(SPELLING_CHOICES))
    choices[0], choices[gold] = choices[gold], choices[0]
    return Example(_cloze_context(src, d, s), tuple(choices), gold)


def draw_kv_recall(src: Optional[HeldOut], rng: np.random.Generator) -> Example:
    """`a:7 q:3 z:9 d:1 q:` -> `3`: KV_PAIRS distinct letters with distinct digits, one key asked again; the choices are
    the values present. The asked key is uniform among them, so a scorer that does not look it up is right 1/KV_PAIRS
    of the time."""
    keys = rng.choice(list("abcdefghijklmnopqrstuvwxyz"), KV_PAIRS, replace=False)
    values = rng.choice(list("0123456789"), KV_PAIRS, replace=False)
    q = int(rng.integers(KV_PAIRS))
    return Example(" ".join(f"{k}:{v}" for k, v in zip(keys, values)) + f" {keys[q]}:", tuple(values), q)


def draw_copy(src: HeldOut, rng: np.random.Generator) -> Example:
    """COPY_WORDS words drawn from the COPY_POOL commonest words (3+ letters) of the held-out documents, a period,
    then the first j of them again: the target is word j + 1 (exact match). Induction (Olsson et al. 2022): the
    answer is in the context; a model that ignores it names a pool word with probability 1/COPY_POOL."""
    pool = src.common_words[:COPY_POOL]
    if len(pool) < COPY_POOL:
        raise ValueError(f"the held-out documents hold {len(pool)} distinct words of 3+ letters, fewer than the "
                         f"{COPY_POOL} copy draws from: raise data.val_fraction or use a larger corpus")
    words = [pool[i] for i in rng.choice(COPY_POOL, COPY_WORDS, replace=False)]
    j = int(rng.integers(1, COPY_WORDS))
    return Example(" ".join(words) + ". " + " ".join(words[:j]), target=" " + words[j])


_LETTER_RULES: tuple[Callable[[str], str], ...] = (
    lambda s: s, lambda s: s[::-1], lambda s: s[1:] + s[:1], lambda s: s[-1:] + s[:-1])
_NUMBER_RULES: tuple[Callable[[int], int], ...] = (lambda n: n + 1, lambda n: n - 1, lambda n: n + 10, lambda n: 2 * n)


def draw_pattern(src: Optional[HeldOut], rng: np.random.Generator, k: int) -> Example:
    """k shown examples of one rule, then the query: its output under each of PATTERN_RULES rules is a choice.
    Rules on 3 distinct letters (copy, reverse, rotate left, rotate right: `abc -> cba`) or on a number in 11..89
    (+1, -1, +10, x2: `17 -> 18`); the outputs are distinct. The rule is uniform, so without the shown examples
    (or k = 0) every scorer is right 1/PATTERN_RULES of the time."""
    letters = bool(rng.integers(2))
    rule = int(rng.integers(PATTERN_RULES))

    def draw_input() -> Any:
        return "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 3, replace=False)) if letters \
            else int(rng.integers(11, 90))

    rules = _LETTER_RULES if letters else _NUMBER_RULES
    shots = tuple(f"{x} -> {rules[rule](x)}" for x in (draw_input() for _ in range(k)))
    query = draw_input()
    return Example(f"{query} ->", tuple(f" {f(query)}" for f in rules), rule, shots=shots, sep="\n")


@dataclass(frozen=True)
class TaskSpec:
    """A task of the registry: `build(source, rng, k)` draws one example with its k shots (None for HF tasks, which
    convert dataset rows with `hf`)."""

    name: str
    kind: str
    chance: Optional[float]  # None: the mean of 1 / number of choices over the examples
    shots: int  # default k
    needs_text: bool  # built from the run's held-out documents
    build: Optional[Callable[[Optional[HeldOut], np.random.Generator, int], Example]] = None
    hf: Optional["HFSource"] = None


def _with_shots(draw: Callable[[Optional[HeldOut], np.random.Generator], Example]):
    """k shots for a task whose examples are independent: k more solved draws before the query."""
    def build(src: Optional[HeldOut], rng: np.random.Generator, k: int) -> Example:
        shots = tuple(draw(src, rng).solved() for _ in range(k))
        return dataclasses.replace(draw(src, rng), shots=shots)
    return build


# --------------------------------------------------------------------------------------------------------------------
# Real benchmarks through Hugging Face datasets
# --------------------------------------------------------------------------------------------------------------------
def _hellaswag_text(text: str) -> str:
    # lm-eval-harness's hellaswag preprocess: WikiHow's " [title]" markers and other brackets out
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag(row: dict) -> Example:
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return Example(_hellaswag_text(row["activity_label"] + ": " + ctx),
                   tuple(" " + _hellaswag_text(e) for e in row["endings"]), int(row["label"]))


def _lambada(row: dict) -> Example:
    context, word = row["text"].rsplit(" ", 1)
    return Example(context, target=" " + word)


def _arc(row: dict) -> Example:
    labels = list(row["choices"]["label"])
    return Example(f"Question: {row['question']}\nAnswer:", tuple(" " + t for t in row["choices"]["text"]),
                   labels.index(row["answerKey"]))


def _piqa(row: dict) -> Example:
    return Example(f"Question: {row['goal']}\nAnswer:", (" " + row["sol1"], " " + row["sol2"]), int(row["label"]))


@dataclass(frozen=True)
class HFSource:
    path: str
    config: Optional[str]
    split: str
    convert: Callable[[dict], Example]


def load_hf_rows(source: HFSource, cache_dir: Path) -> list[dict]:
    """Every row of the split, through `datasets` (downloaded once, then read from `cache_dir`). Tests patch this."""
    import datasets  # slow to import: only when a benchmark is asked for

    ds = datasets.load_dataset(source.path, source.config, split=source.split, cache_dir=str(cache_dir))
    return list(ds)


# --------------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------------
OFFLINE = ("cloze", "spelling", "kv_recall", "copy", "pattern")
TASKS: dict[str, TaskSpec] = {
    "cloze": TaskSpec("cloze", "mc", 1 / CLOZE_CHOICES, 0, True, _with_shots(draw_cloze)),
    "spelling": TaskSpec("spelling", "mc", 1 / SPELLING_CHOICES, 0, True, _with_shots(draw_spelling)),
    "kv_recall": TaskSpec("kv_recall", "mc", 1 / KV_PAIRS, 0, False, _with_shots(draw_kv_recall)),
    "copy": TaskSpec("copy", "exact", 1 / COPY_POOL, 0, True, _with_shots(draw_copy)),
    "pattern": TaskSpec("pattern", "mc", 1 / PATTERN_RULES, 3, False, draw_pattern),
    "hellaswag": TaskSpec("hellaswag", "mc", None, 0, False,
                          hf=HFSource("Rowan/hellaswag", None, "validation", _hellaswag)),
    "lambada": TaskSpec("lambada", "exact", 0.0, 0, False,
                        hf=HFSource("EleutherAI/lambada_openai", "default", "test", _lambada)),
    "arc_easy": TaskSpec("arc_easy", "mc", None, 0, False, hf=HFSource("allenai/ai2_arc", "ARC-Easy", "test", _arc)),
    "piqa": TaskSpec("piqa", "mc", None, 0, False, hf=HFSource("baber/piqa", None, "validation", _piqa)),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose among {', '.join(TASKS)} (offline suite: "
                         f"{','.join(OFFLINE)})")
    return TASKS[name]


def parse_tasks(text: str | list[str]) -> list[str]:
    """`cloze,kv_recall` (or a list) -> validated names; `offline` stands for the offline suite."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    out: list[str] = []
    for n in names:
        for m in (OFFLINE if n == "offline" else (n,)):
            task_spec(m)
            if m not in out:
                out.append(m)
    return out


def _rng(seed: int, index: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, index, zlib.crc32(name.encode())])


def build_task(name: str, src: Optional[HeldOut], seed: int = 0, k: Optional[int] = None, n: int = 200,
               cache_dir: Optional[Path] = None) -> Task:
    """`n` examples of task `name` with `k` shots (default: the task's own), drawn from `seed`."""
    spec = task_spec(name)
    k = spec.shots if k is None else k
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"shots={k!r} is invalid: give a number of demonstrations >= 0")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"limit={n!r} is invalid: give a positive number of examples")
    if spec.hf is not None:
        examples = _hf_examples(spec, seed, k, n, cache_dir)
        tokenizer = None
    else:
        if spec.needs_text and src is None:
            raise ValueError(f"task {name} is built from held-out documents: pass HeldOut(...) (evaluate builds it "
                             "from the run's data)")
        examples = tuple(spec.build(src, _rng(seed, i, name), k) for i in range(n))
        tokenizer = src.tokenizer if spec.needs_text and src is not None else None
    chance = spec.chance if spec.chance is not None else float(np.mean([1 / len(e.choices) for e in examples]))
    return Task(name, spec.kind, examples, k, seed, chance, tokenizer)


def _hf_examples(spec: TaskSpec, seed: int, k: int, n: int, cache_dir: Optional[Path]) -> tuple[Example, ...]:
    assert spec.hf is not None
    cache_dir = (Path(cache_dir).expanduser() if cache_dir else cache_root()) / "hf"
    try:
        rows = load_hf_rows(spec.hf, cache_dir)
    except Exception as e:  # noqa: BLE001 - offline (ConnectionError, HF_DATASETS_OFFLINE), or not in the cache
        raise ValueError(
            f"task {spec.name} needs the Hugging Face dataset {spec.hf.path} ({spec.hf.config or 'default'}, split "
            f"{spec.hf.split}), which could not be loaded ({type(e).__name__}: {str(e)[:200]}); it downloads once "
            f"(then cached in {cache_dir}) and this machine seems offline. Offline, use the suite that ships with "
            f"the package: --tasks {','.join(OFFLINE)}") from None
    pool = [spec.hf.convert(r) for r in rows]
    if len(pool) < k + 1:
        raise ValueError(f"task {spec.name} has {len(pool)} examples, too few for {k} shots plus a query")
    order = np.random.default_rng([seed, zlib.crc32(spec.name.encode())]).permutation(len(pool))
    out = []
    for i, idx in enumerate(order[:n]):
        rng = _rng(seed, i, spec.name)
        others = [j for j in rng.choice(len(pool), min(len(pool), k + 1), replace=False) if j != idx][:k]
        out.append(dataclasses.replace(pool[idx], shots=tuple(pool[j].solved() for j in others)))
    return tuple(out)


# --------------------------------------------------------------------------------------------------------------------
# The `eval` config
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    """Downstream evaluation of a run at its end (record field `eval`) and, with `every_eval`, at each of its
    evaluation steps (metrics.jsonl). Empty `tasks`: off (the default)."""

    tasks: list[str] = field(default_factory=list)  # names, or "offline" for the offline suite
    shots: Optional[int] = None  # None: each task's default (pattern 3, the others 0)
    limit: int = 200  # examples per task
    seed: int = 0
    every_eval: bool = False

    def __post_init__(self) -> None:
        try:
            self.tasks = parse_tasks(list(self.tasks))
        except ValueError as e:
            raise ValueError(f"eval.tasks={list(self.tasks)!r}: {e}") from None
        if self.shots is not None and (isinstance(self.shots, bool) or not isinstance(self.shots, int)
                                       or self.shots < 0):
            raise ValueError(f"eval.shots={self.shots!r} is invalid: give a number of demonstrations >= 0, or null "
                             "for each task's default")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"eval.limit={self.limit!r} is invalid: give a positive number of examples per task")
