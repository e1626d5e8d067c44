"""Fine-tuning tasks in text-to-text form (T5 paper, section 2.4); their mixture (section 3.5.2) is
`pipeline/data/mixture.py`, their metrics and baselines `pipeline/data/task_metrics.py`.

A `Task` has a name, an input prefix (`summarize: `), a builder that returns `Example`s for a split, a metric
and, for classification, its class strings. `Example.inputs` already starts with the prefix. Tasks are looked
up by name in `TASKS`; `params.yaml`'s `finetune.tasks` maps names to option overrides. Each task declares its
options as a pydantic model (`TaskOptions`, beside the task in the registry below): defaults, types, bounds and
docs in one place, validated by `pipeline/config/` with the rest of the params (`TaskMixture`).

Offline defaults:
- `summarize`: a document of the prepared corpus (a docstring, a reference entry) without its first sentence
  -> that first sentence (ROUGE-L). Splits are the prepared corpus's own splits.
- `listops`: ListOps from the Long Range Arena (Tay et al. 2021): a generated nested expression of MAX, MIN,
  MED (median) and SM (sum modulo 10) over digits -> its value (accuracy, classes "0".."9"); `operators`,
  `max_depth` and `max_args` scale it down to what a tiny model learns in minutes.
- `sort`: distinct digits in random order -> the same digits sorted (exact match): learnable by tiny models,
  and copying the input (the trivial baseline) is rarely right.
- `lra_listops`: ListOps exactly as the Long Range Arena generates it (500 to 2000 tokens, 96K/2K/2K), for
  the cluster preset `configs/lra_listops.yaml`.
- `duplication`: the Reformer paper's duplication task (Kitaev et al. 2020, section 2.1) in text-to-text form:
  a random sequence of symbols -> the same sequence (exact match).
Generated tasks are seeded per split and every example is assigned to one split by a hash of its input, so
train, validation and test never share an input.

Hub recipes (need the network or a local copy; options name the dataset, config and splits):
`sst2` (GLUE SST-2 sentiment, accuracy), `squad` (SQuAD v1.1, exact match), `cnn_dailymail` (ROUGE-L),
`wmt_en_de` (WMT14 English to German, BLEU). Input formats follow the T5 paper's appendix D.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, PlainSerializer, create_model, model_validator

from pipeline.config.validation import Fraction, NonNegInt, PosInt, Problems, Section

SPLITS = ("train", "validation", "test")


METRICS = ("rouge_l", "bleu", "accuracy", "exact_match", "token_accuracy")


DEFAULT_PREPARED_DIR = "data/prepared"


@dataclass(frozen=True)
class Example:
    """One text-to-text example; `inputs` includes the task prefix, `label` is the class for classification."""

    inputs: str
    targets: str
    label: str | None = None


class TaskOptions(Section):
    """A task's options (`finetune.tasks.<task>`): one field each, with its default, type, bounds and docstring."""

    ITEM: ClassVar[str] = "option"


@dataclass
class TaskContext:
    """What a builder may use: the prepared corpus (loaded lazily from `prepared_dir`), the seed, the options.

    `options` are the overrides from `finetune.tasks.<name>`; the task fills in its defaults.
    Pass `corpus` (a `datasets.DatasetDict` with a `text` column) to skip loading from disk.
    """

    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    prepared_dir: str | Path = DEFAULT_PREPARED_DIR
    corpus: Any = None

    def load_corpus(self) -> Any:
        if self.corpus is None:
            path = Path(self.prepared_dir)
            if not (path / "dataset_dict.json").is_file():
                raise FileNotFoundError(f"prepared corpus not found at {path} (run `dvc repro prepare` first)")
            from datasets import load_from_disk

            self.corpus = load_from_disk(str(path))
        return self.corpus


Builder = Callable[[str, TaskContext, dict[str, Any]], list[Example]]


@dataclass(frozen=True)
class Task:
    """A registered task: `build(split, ctx)` returns its examples for `train`, `validation` or `test`."""

    name: str
    prefix: str
    metric: str
    builder: Builder = field(repr=False)
    options: type[TaskOptions] = TaskOptions
    classes: list[str] | None = None
    description: str = ""
    capacity: Callable[[dict[str, Any]], int | None] | None = field(default=None, repr=False)
    """How many distinct inputs the resolved options allow (None: too many to matter), for generated tasks whose
    options can make that smaller than the examples asked for: checked when the params are validated."""

    def resolve_options(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """The defaults updated with `overrides` (unchecked: the params were validated when loaded)."""
        defaults = {k: f.get_default(call_default_factory=True) for k, f in self.options.model_fields.items()}
        return defaults | dict(overrides or {})

    def build(self, split: str, ctx: TaskContext) -> list[Example]:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.builder(split, ctx, self.resolve_options(ctx.options))


def _split_rng(seed: int, task: str, split: str) -> random.Random:
    # Python's Random: fast scalar draws, and string seeds are hashed with SHA-512 (stable across runs)
    return random.Random(f"{seed}/{task}/{split}")


def _hash_split(text: str) -> str:
    """The one split an input belongs to (stable hash), so generated splits never share an input."""
    return SPLITS[int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") % len(SPLITS)]


def split_shortfall(name: str, overrides: dict[str, Any]) -> str | None:
    """Why `name` with these options cannot give its `num_examples` / `num_eval_examples` distinct examples per
    split, or None. A split holds the inputs hashed to it, about a third of those the options allow: the check
    asks for that third less four standard deviations, so a run that passes it does not fail to generate."""
    task = get_task(name)
    o = task.resolve_options(overrides)
    total = task.capacity(o) if task.capacity else None
    if total is None:
        return None
    share = 1 / len(SPLITS)
    can = int(total * share - 4 * math.sqrt(total * share * (1 - share)))
    asked = max(o["num_examples"], o["num_eval_examples"])
    if asked <= can:
        return None
    return (
        f"task {name}: these options allow {total:,} distinct inputs, about {round(total * share):,} per split, "
        f"too few for the {asked:,} examples asked for; lower num_examples/num_eval_examples or allow longer or "
        "more varied inputs"
    )


def _generated(
    name: str, split: str, ctx: TaskContext, count: int, draw: Callable[[random.Random], Example | None]
) -> list[Example]:
    """`count` distinct examples drawn with the split's generator, keeping only those hashed to this split."""
    rng = _split_rng(ctx.seed, name, split)
    out: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 300 * count + 10_000:
            raise ValueError(
                f"task {name}: could not generate {count} distinct {split} examples with these options "
                f"(got {len(out)}); allow longer or more varied inputs"
            )
        example = draw(rng)
        if example is None or example.inputs in seen or _hash_split(example.inputs) != split:
            continue
        seen.add(example.inputs)
        out.append(example)
    return out


def _count(split: str, options: dict[str, Any]) -> int:
    return options["num_examples"] if split == "train" else options["num_eval_examples"]


_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")  # reST/pydoc heading underline: *****, =====, -----


_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def split_first_sentence(text: str, max_words: int = 60) -> tuple[str, str] | None:
    """(first sentence, rest) of a document, skipping a leading heading; None when there is no such pair.

    The first sentence must end with `.`, `!` or `?` inside the first paragraph and have 3 to `max_words`
    words; the rest must not be empty.
    """
    lines = text.strip().splitlines()
    start = 0
    while start < len(lines) and (not lines[start].strip() or _UNDERLINE.match(lines[start])):
        start += 1
    if start + 1 < len(lines) and _UNDERLINE.match(lines[start + 1]):  # "Title\n*****": drop the heading
        start += 2
    body = "\n".join(lines[start:]).strip()
    paragraph_end = body.find("\n\n")
    match = _SENTENCE_END.search(body, 0, paragraph_end if paragraph_end >= 0 else len(body))
    if match is None:
        return None
    first = " ".join(body[: match.end()].split())
    rest = body[match.end() :].strip()
    if not rest or not 3 <= len(first.split()) <= max_words:
        return None
    return first, rest


def _build_summarize(split: str, ctx: TaskContext, o: dict[str, Any]) -> list[Example]:
    dataset = ctx.load_corpus()[split]
    prefix = TASKS["summarize"].prefix
    out: list[Example] = []
    for batch in dataset.iter(batch_size=1000):
        for text in batch["text"]:
            pair = split_first_sentence(text, max_words=o["max_target_words"])
            if pair is None or len(pair[1]) < o["min_body_chars"]:
                continue
            body = " ".join(pair[1][: o["max_input_chars"]].split())
            out.append(Example(prefix + body, pair[0]))
            if o["max_examples"] is not None and len(out) >= o["max_examples"]:
                return out
    return out


LISTOPS_OPERATORS = ("MAX", "MIN", "MED", "SM")


def listops_value(operator: str, values: list[int]) -> int:
    """Value of one ListOps operator over digits (MED: the lower median for even counts, as LRA's int())."""
    if operator == "MAX":
        return max(values)
    if operator == "MIN":
        return min(values)
    if operator == "MED":  # int(np.median(values)), without numpy's per-call cost (a third of generating a tree)
        ordered, half = sorted(values), len(values) // 2
        return ordered[half] if len(values) % 2 else (ordered[half - 1] + ordered[half]) // 2
    if operator == "SM":
        return sum(values) % 10
    raise ValueError(f"unknown ListOps operator {operator!r}")


class _TooLong(Exception):
    """Raised inside `_listops_tree` once an expression outgrows its character budget."""


def _listops_tree(
    rng: random.Random,
    depth: int,
    max_depth: int,
    max_args: int,
    leaf_p: float,
    budget: list[int],
    in_tokens: bool = False,
    operators: tuple[str, ...] | list[str] = LISTOPS_OPERATORS,
) -> tuple[str, int]:
    """(expression, value); the root is always an operator, deeper nodes are digits with probability leaf_p.

    `budget` holds the characters (or, `in_tokens`, the whitespace tokens `[MAX`, `7`, `]`) still allowed;
    generation stops with `_TooLong` when it runs out, so long settings (LRA: depth 10, 10 arguments) never
    build the huge trees that would be rejected anyway.
    """
    if depth >= max_depth or (depth > 1 and rng.random() < leaf_p):
        budget[0] -= 1 if in_tokens else 2  # "d "
        if budget[0] < 0:
            raise _TooLong
        digit = rng.randrange(10)
        return str(digit), digit
    operator = rng.choice(operators)
    budget[0] -= 2 if in_tokens else len(operator) + 4  # "[OP " and "] "
    if budget[0] < 0:
        raise _TooLong
    args = [
        _listops_tree(rng, depth + 1, max_depth, max_args, leaf_p, budget, in_tokens, operators)
        for _ in range(rng.randint(2, max_args))
    ]
    text = f"[{operator} " + " ".join(a[0] for a in args) + " ]"
    return text, listops_value(operator, [a[1] for a in args])


def _build_listops(split: str, ctx: TaskContext, o: dict[str, Any]) -> list[Example]:
    prefix = TASKS["listops"].prefix
    operators = list(o["operators"])
    unknown = sorted(set(operators) - set(LISTOPS_OPERATORS))
    if not operators or unknown:
        raise ValueError(f"task listops: operators must be a non-empty subset of {LISTOPS_OPERATORS}, got {operators}")

    def draw(rng: random.Random) -> Example | None:
        try:
            # the budget counts one trailing space too many, hence + 1
            text, value = _listops_tree(
                rng, 1, o["max_depth"], o["max_args"], o["leaf_probability"], [o["max_chars"] + 1], False, operators
            )
        except _TooLong:
            return None
        if not o["min_chars"] <= len(text) <= o["max_chars"]:
            return None
        return Example(prefix + text, str(value), label=str(value))

    return _generated("listops", split, ctx, _count(split, o), draw)


def _build_lra_listops(split: str, ctx: TaskContext, o: dict[str, Any]) -> list[Example]:
    """ListOps as the Long Range Arena generates it (Tay et al. 2021, section 3.1; Nangia and Bowman 2018):
    operators MAX, MIN, MED, SM; nesting depth up to 10; 2 to 10 arguments; every nested argument a digit
    with probability 0.75; sequences of 500 to 2000 tokens; 96K/2K/2K examples; 10 classes."""
    prefix = TASKS["lra_listops"].prefix

    def draw(rng: random.Random) -> Example | None:
        try:
            budget = [o["max_tokens"]]
            text, value = _listops_tree(
                rng, 1, o["max_depth"], o["max_args"], o["leaf_probability"], budget, in_tokens=True
            )
        except _TooLong:
            return None
        if o["max_tokens"] - budget[0] < o["min_tokens"]:
            return None
        return Example(prefix + text, str(value), label=str(value))

    return _generated("lra_listops", split, ctx, _count(split, o), draw)


def listops_tokens(expression: str) -> int:
    """Length of a ListOps expression in LRA tokens (`[MAX`, digits and `]` each count one)."""
    return len(expression.split())


def duplication_symbols(vocab_size: int) -> list[str]:
    """`vocab_size` distinct symbols: a..z, then two-letter symbols aa, ab, ..."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    symbols = letters + [a + b for a in letters for b in letters]
    if vocab_size > len(symbols):
        raise ValueError(f"at most {len(symbols)} duplication symbols, asked for {vocab_size}")
    return symbols[:vocab_size]


def _build_duplication(split: str, ctx: TaskContext, o: dict[str, Any]) -> list[Example]:
    prefix = TASKS["duplication"].prefix
    symbols = duplication_symbols(o["vocab_size"])

    def draw(rng: random.Random) -> Example:
        w = " ".join(rng.choices(symbols, k=o["length"]))
        return Example(prefix + w, w)

    return _generated("duplication", split, ctx, _count(split, o), draw)


def _build_sort(split: str, ctx: TaskContext, o: dict[str, Any]) -> list[Example]:
    """Distinct digits in random order -> the same digits in increasing order (exact match)."""
    prefix = TASKS["sort"].prefix
    if o["min_length"] > o["max_length"]:
        raise ValueError(f"task sort: min_length {o['min_length']} > max_length {o['max_length']}")

    def draw(rng: random.Random) -> Example:
        digits = rng.sample(range(10), rng.randint(o["min_length"], o["max_length"]))
        return Example(prefix + " ".join(map(str, digits)), " ".join(map(str, sorted(digits))))

    return _generated("sort", split, ctx, _count(split, o), draw)


def _sort_capacity(o: dict[str, Any]) -> int:
    """Distinct sort inputs: ordered draws of k of the 10 digits for each allowed k."""
    return sum(math.perm(10, k) for k in range(o["min_length"], o["max_length"] + 1))


NEEDLE_FILLER = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def _build_needle(split: str, ctx: TaskContext, o: dict[str, Any]) -> list[Example]:
    """A needle among filler: `min_items`..`max_items` symbols, all letters drawn from the first `filler` of a..z
    but one, a digit at a uniform position; the answer is that digit. The answer depends on one token anywhere in
    the input, so a model has to reach every position (the `lengths` stage sets the item counts to fill each
    length: one symbol is one token). Trivial baselines: chance 0.1, majority about 0.1."""
    prefix = TASKS["needle"].prefix
    if o["min_items"] > o["max_items"]:
        raise ValueError(f"task needle: min_items {o['min_items']} > max_items {o['max_items']}")
    filler = NEEDLE_FILLER[: o["filler"]]

    def draw(rng: random.Random) -> Example:
        items = rng.choices(filler, k=rng.randint(o["min_items"], o["max_items"]))
        digit = str(rng.randrange(10))
        items[rng.randrange(len(items))] = digit
        return Example(prefix + " ".join(items), digit, label=digit)

    return _generated("needle", split, ctx, _count(split, o), draw)


def _needle_capacity(o: dict[str, Any], enough: int = 10**9) -> int | None:
    """Distinct needle inputs: for n symbols, the digit's position and value times the filler around it."""
    total = 0
    for n in range(o["min_items"], o["max_items"] + 1):
        total += n * 10 * o["filler"] ** (n - 1)
        if total > enough:
            return None
    return total


def _load_hub_split(split: str, o: dict[str, Any]) -> Any:
    """`datasets.load_dataset` for our split (the options map it to a dataset split, slicing allowed)."""
    from datasets import load_dataset

    return load_dataset(
        o["path"], o["name"], split=o[f"{split}_split"], revision=o["revision"], cache_dir=o["cache_dir"]
    )


def _hub_builder(task_name: str, convert: Callable[[dict[str, Any], str], Example | None]) -> Builder:
    def build(split: str, ctx: TaskContext, o: dict[str, Any]) -> list[Example]:
        prefix = TASKS[task_name].prefix
        out: list[Example] = []
        for row in _load_hub_split(split, o):
            example = convert(row, prefix)
            if example is not None:
                out.append(example)
                if o["max_examples"] is not None and len(out) >= o["max_examples"]:
                    break
        return out

    return build


def _sst2(row: dict[str, Any], prefix: str) -> Example | None:
    if row["label"] not in (0, 1):  # GLUE's test split has hidden labels (-1)
        return None
    label = ("negative", "positive")[row["label"]]
    return Example(prefix + row["sentence"].strip(), label, label=label)


def _squad(row: dict[str, Any], prefix: str) -> Example | None:
    answers = row["answers"]["text"]
    if not answers:
        return None
    return Example(f"{prefix}{row['question'].strip()} context: {row['context'].strip()}", answers[0])


def _cnn_dailymail(row: dict[str, Any], prefix: str) -> Example:
    return Example(prefix + row["article"].strip(), row["highlights"].strip())


def _wmt_en_de(row: dict[str, Any], prefix: str) -> Example:
    return Example(prefix + row["translation"]["en"].strip(), row["translation"]["de"].strip())


class HubOptions(TaskOptions):
    """Options of a hub recipe; `_hub_options` sets each recipe's dataset and split defaults."""

    path: str
    """Dataset on the hub, or a local directory of data files."""
    name: str | None
    """Dataset configuration (None for none)."""
    revision: str | None = None
    """Dataset revision (branch, tag or commit)."""
    train_split: str = "train"
    """Dataset split (slicing allowed) used as our train split."""
    validation_split: str
    """Dataset split used as our validation split."""
    test_split: str
    """Dataset split used as our test split (disjoint from validation)."""
    max_examples: PosInt | None = None
    """Keep at most this many examples per split."""
    cache_dir: str | None = None
    """Datasets cache directory (None: the datasets default)."""


def _hub_options(task: str, path: str, name: str | None, validation: str, test: str) -> type[HubOptions]:
    defaults = {"path": path, "name": name, "validation_split": validation, "test_split": test}
    fields = {k: (HubOptions.model_fields[k].annotation, Field(v, description=HubOptions.model_fields[k].description))
              for k, v in defaults.items()}  # fmt: skip
    return create_model(f"{task}_options", __base__=HubOptions, **fields)


class SummarizeOptions(TaskOptions):
    max_examples: PosInt | None = 2000
    """Keep at most this many examples per split."""
    min_body_chars: PosInt = 80
    """Skip documents whose rest is shorter than this."""
    max_input_chars: PosInt = 400
    """Cut the input text to this many characters."""
    max_target_words: Annotated[int, Field(ge=3)] = 25
    """Skip documents whose first sentence is longer."""


class GeneratedOptions(TaskOptions):
    num_examples: PosInt = 2000
    """Train examples."""
    num_eval_examples: PosInt = 200
    """Validation and test examples (each)."""


class ListopsOptions(GeneratedOptions):
    max_depth: PosInt = 5
    """Maximum nesting depth of operators (LRA: 10)."""
    max_args: Annotated[int, Field(ge=2)] = 5
    """Maximum arguments per operator (LRA: 10)."""
    min_chars: NonNegInt = 40
    """Shortest expression in characters (LRA: about 500 tokens)."""
    max_chars: Annotated[int, Field(ge=5)] = 200
    """Longest expression in characters (LRA: 2000 tokens)."""
    leaf_probability: Fraction = 0.6
    """Chance that a nested argument is a digit (LRA: 0.75)."""
    operators: list[str] = Field(default_factory=lambda: list(LISTOPS_OPERATORS))
    """Operators drawn (LRA: MAX, MIN, MED, SM)."""


class LraListopsOptions(GeneratedOptions):
    num_examples: PosInt = 96_000
    """Train examples (LRA: 96K)."""
    num_eval_examples: PosInt = 2000
    """Validation and test examples, each (LRA: 2K)."""
    max_depth: PosInt = 10
    """Maximum nesting depth of operators."""
    max_args: Annotated[int, Field(ge=2)] = 10
    """Maximum arguments per operator."""
    min_tokens: NonNegInt = 500
    """Shortest expression in tokens ([MAX, digit and ] count one)."""
    max_tokens: Annotated[int, Field(ge=5)] = 2000
    """Longest expression in tokens."""
    leaf_probability: Fraction = 0.75
    """Chance that a nested argument is a digit."""


class DuplicationOptions(GeneratedOptions):
    length: PosInt = 16
    """Symbols per sequence (the paper: 511)."""
    vocab_size: Annotated[int, Field(ge=2)] = 16
    """Distinct symbols (the paper: 127)."""


class NeedleOptions(GeneratedOptions):
    min_items: Annotated[int, Field(ge=2)] = 48
    """Fewest symbols in the input (the needle included); one symbol is one token."""
    max_items: Annotated[int, Field(ge=2)] = 60
    """Most symbols in the input."""
    filler: Annotated[int, Field(ge=1, le=26)] = 4
    """Distinct filler letters (a, b, ...): 1 makes the haystack constant, more make it noisier."""


class SortOptions(GeneratedOptions):
    min_length: Annotated[int, Field(ge=2)] = 3
    """Fewest digits per sequence."""
    max_length: Annotated[int, Field(ge=2, le=10)] = 5
    """Most digits per sequence (distinct digits: at most 10)."""


TASKS: dict[str, Task] = {
    task.name: task
    for task in [
        Task(
            "summarize",
            "summarize: ",
            "rouge_l",
            _build_summarize,
            SummarizeOptions,
            description="prepared corpus: a document without its first sentence -> that sentence",
        ),
        Task(
            "listops",
            "listops: ",
            "accuracy",
            _build_listops,
            ListopsOptions,
            classes=[str(d) for d in range(10)],
            description="generated LRA ListOps expression -> its value",
        ),
        Task(
            "lra_listops",
            "listops: ",
            "accuracy",
            _build_lra_listops,
            LraListopsOptions,
            classes=[str(d) for d in range(10)],
            description="Long Range Arena ListOps (500-2000 tokens, depth <= 10, <= 10 arguments) -> its value",
        ),
        Task(
            "duplication",
            "duplicate: ",
            "token_accuracy",
            _build_duplication,
            DuplicationOptions,
            description="Reformer section 2.1: a random symbol sequence -> the same sequence (accuracy per symbol)",
        ),
        Task(
            "needle",
            "needle: ",
            "accuracy",
            _build_needle,
            NeedleOptions,
            classes=[str(d) for d in range(10)],
            description="one digit among filler letters -> that digit (a needle in a haystack of any length)",
            capacity=_needle_capacity,
        ),
        Task(
            "sort",
            "sort: ",
            "exact_match",
            _build_sort,
            SortOptions,
            description="distinct digits in random order -> sorted (a copy that needs comparisons)",
            capacity=_sort_capacity,
        ),
        Task(
            "sst2",
            "sst2 sentence: ",
            "accuracy",
            _hub_builder("sst2", _sst2),
            _hub_options("sst2", "nyu-mll/glue", "sst2", "validation[:50%]", "validation[50%:]"),
            classes=["negative", "positive"],
            description="GLUE SST-2 (test labels are hidden, so our validation/test halve its validation split)",
        ),
        Task(
            "squad",
            "question: ",
            "exact_match",
            _hub_builder("squad", _squad),
            _hub_options("squad", "rajpurkar/squad", None, "validation[:50%]", "validation[50%:]"),
            description="SQuAD v1.1: question + context -> the first reference answer",
        ),
        Task(
            "cnn_dailymail",
            "summarize: ",
            "rouge_l",
            _hub_builder("cnn_dailymail", _cnn_dailymail),
            _hub_options("cnn_dailymail", "abisee/cnn_dailymail", "3.0.0", "validation", "test"),
            description="CNN/DailyMail: article -> highlights",
        ),
        Task(
            "wmt_en_de",
            "translate English to German: ",
            "bleu",
            _hub_builder("wmt_en_de", _wmt_en_de),
            _hub_options("wmt_en_de", "wmt/wmt14", "de-en", "validation", "test"),
            description="WMT14 English to German (newstest2013 validation, newstest2014 test)",
        ),
    ]
}


def get_task(name: str) -> Task:
    """The registered task `name`; `KeyError` naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def build_examples(
    tasks: dict[str, dict[str, Any] | None],
    split: str,
    seed: int,
    prepared_dir: str | Path = DEFAULT_PREPARED_DIR,
    corpus: Any = None,
) -> dict[str, list[Example]]:
    """Examples of every task in `tasks` (name -> option overrides, as in `finetune.tasks`) for `split`."""
    ctx = TaskContext(seed=seed, prepared_dir=prepared_dir, corpus=corpus)
    out = {}
    for name, options in tasks.items():
        ctx.options = dict(options or {})
        out[name] = get_task(name).build(split, ctx)
    return out


class _Mixture(Section):
    """`finetune.tasks`: task name -> its options (null: the defaults); at least one task."""

    ITEM: ClassVar[str] = "task"

    @model_validator(mode="after")
    def _at_least_one(self) -> _Mixture:
        if not self.model_fields_set:
            raise Problems([f"<here>: at least one task is needed (known: {', '.join(TASKS)})"])
        return self

    @model_validator(mode="after")
    def _enough_inputs(self) -> _Mixture:
        problems = []
        for name in [n for n in TASKS if n in self.model_fields_set]:  # registry order: the same message every run
            options = getattr(self, name)
            given = options.model_dump(exclude_unset=True) if options is not None else {}
            if (shortfall := split_shortfall(name, given)) is not None:
                problems.append(f"{name}: {shortfall}")
        if problems:
            raise Problems(problems)
        return self


TaskMixtureModel = create_model(
    "TaskMixtureModel",
    __base__=_Mixture,
    **{name: (task.options | None, Field(None, description=task.description)) for name, task in TASKS.items()},
)


TaskMixture = Annotated[
    TaskMixtureModel,
    AfterValidator(lambda mixture: mixture.model_dump(exclude_unset=True)),
    PlainSerializer(lambda tasks: tasks),
]
"""The type of `finetune.tasks`: validated as one field per task, each its `TaskOptions` model; kept as the
mapping of the tasks given to their given options (`build_examples` fills in the defaults)."""
