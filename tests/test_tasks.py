"""Fine-tuning tasks: builders, split disjointness, options validation, mixing rates, mixture, metrics, hub recipes."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
import yaml

from pipeline.config import ConfigError, config_from_dict
from pipeline.data.mixture import Mixture, mixing_rates
from pipeline.data.task_metrics import baselines, example_scores, score
from pipeline.data.tasks import (
    SPLITS,
    TASKS,
    Example,
    TaskContext,
    build_examples,
    get_task,
    listops_tokens,
    listops_value,
    split_first_sentence,
)

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def shipped_params() -> dict:
    return yaml.safe_load(PARAMS.read_text(encoding="utf-8"))


DOCS = [
    "Return the absolute value of the argument. The argument may be an integer, a float, or an object "
    "implementing __abs__(). If the argument is a complex number, its magnitude is returned.",
    "Open a file and return a stream. Raise OSError upon failure. The file is a text or byte string giving "
    "the name of the file to be opened or an integer file descriptor of the file to be wrapped.",
    'The "assert" statement\n**********************\n\nAssert statements are a convenient way to insert '
    "debugging assertions into a program. The simple form is equivalent to an if statement that raises "
    "AssertionError when the expression is false and debugging is enabled.",
    "A single sentence document that has nothing after its first sentence at all, so it cannot be used.",
    "no sentence end here just words and words and more words that go on without any final punctuation mark",
]


def tiny_corpus() -> datasets.DatasetDict:
    # split-specific documents: distinct texts per split, like the prepared corpus
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_dict({"text": [f"{d} Seen in {split}." for d in DOCS]}) for split in SPLITS}
    )


# ------------------------------------------------------------------------------------------ summarize


def test_split_first_sentence_skips_headings_and_needs_a_rest():
    first, rest = split_first_sentence(DOCS[0])
    assert first == "Return the absolute value of the argument."
    assert rest.startswith("The argument may be")
    first, rest = split_first_sentence(DOCS[2])
    assert first.startswith("Assert statements are a convenient way")
    assert "*****" not in first and "statement\n" not in first
    assert split_first_sentence(DOCS[3]) is None
    assert split_first_sentence(DOCS[4]) is None


def test_summarize_builds_from_the_corpus_splits():
    corpus = tiny_corpus()
    by_split = {
        split: build_examples({"summarize": {"min_body_chars": 20}}, split, 0, corpus=corpus) for split in SPLITS
    }
    for split, examples in by_split.items():
        examples = examples["summarize"]
        assert len(examples) == 3  # the single-sentence and unpunctuated documents are skipped
        for ex in examples:
            assert ex.inputs.startswith("summarize: ")
            assert ex.targets not in ex.inputs  # the target sentence is cut from the input
            assert f"Seen in {split}." in ex.inputs
    inputs = [{ex.inputs for ex in by_split[s]["summarize"]} for s in SPLITS]
    assert not (inputs[0] & inputs[1] or inputs[0] & inputs[2] or inputs[1] & inputs[2])


def test_summarize_options_limit_examples_and_input_length():
    corpus = tiny_corpus()
    ctx = TaskContext(seed=0, options={"max_examples": 2, "max_input_chars": 30, "min_body_chars": 20}, corpus=corpus)
    examples = get_task("summarize").build("train", ctx)
    assert len(examples) == 2
    assert all(len(ex.inputs) <= len("summarize: ") + 30 for ex in examples)


def test_summarize_loads_the_prepared_corpus_from_disk(tmp_path):
    tiny_corpus().save_to_disk(str(tmp_path / "prepared"))
    examples = build_examples({"summarize": {"min_body_chars": 20}}, "test", 0, prepared_dir=tmp_path / "prepared")
    assert len(examples["summarize"]) == 3
    with pytest.raises(FileNotFoundError, match="prepare"):
        build_examples({"summarize": {}}, "test", 0, prepared_dir=tmp_path / "missing")


# ------------------------------------------------------------------------------------------ generated


def evaluate_listops(expression: str) -> int:
    """An independent evaluator: a recursive-descent parse of the bracketed expression."""
    tokens = expression.replace("]", " ] ").split()
    pos = 0

    def parse() -> int:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok.isdigit():
            return int(tok)
        values = []
        while tokens[pos] != "]":
            values.append(parse())
        pos += 1
        op = tok[1:]
        ordered = sorted(values)
        return {
            "MAX": ordered[-1],
            "MIN": ordered[0],
            "MED": int((ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2),
            "SM": sum(values) % 10,
        }[op]

    value = parse()
    assert pos == len(tokens)
    return value


def test_listops_values():
    assert listops_value("MAX", [3, 9, 1]) == 9
    assert listops_value("MIN", [3, 9, 1]) == 1
    assert listops_value("MED", [3, 9, 1]) == 3
    assert listops_value("MED", [2, 5]) == 3  # int(3.5)
    assert listops_value("SM", [7, 8, 9]) == 4


def test_listops_examples_are_correct_and_within_options():
    options = {"num_examples": 300, "num_eval_examples": 50, "max_chars": 120, "min_chars": 10, "max_depth": 3}
    examples = build_examples({"listops": options}, "train", 3)["listops"]
    assert len(examples) == 300
    task = get_task("listops")
    depths = set()
    for ex in examples:
        assert ex.inputs.startswith(task.prefix)
        expression = ex.inputs[len(task.prefix) :]
        assert 10 <= len(expression) <= 120
        assert ex.targets == ex.label == str(evaluate_listops(expression))
        assert ex.label in task.classes
        depth, deepest = 0, 0
        for ch in expression:
            depth += ch == "["
            depth -= ch == "]"
            deepest = max(deepest, depth)
        depths.add(deepest)
    assert max(depths) <= 3 and len(depths) > 1
    assert len(Counter(ex.label for ex in examples)) == 10


def test_duplication_copies_a_random_symbol_sequence():
    examples = build_examples({"duplication": {"length": 9, "vocab_size": 5, "num_eval_examples": 40}}, "test", 0)
    examples = examples["duplication"]
    assert len(examples) == 40
    for ex in examples:
        w = ex.inputs.removeprefix(get_task("duplication").prefix)
        assert ex.targets == w
        assert len(w.split()) == 9 and set(w.split()) <= set("abcde")
    assert len({ex.targets for ex in examples}) == 40


@pytest.mark.parametrize("name", ["listops", "duplication"])
def test_generated_splits_are_seeded_and_disjoint(name):
    options = {"num_examples": 400, "num_eval_examples": 400}
    if name == "duplication":
        options |= {"length": 4, "vocab_size": 4}  # 256 possible inputs: collisions would be likely
        options |= {"num_examples": 60, "num_eval_examples": 60}
    splits = {s: build_examples({name: options}, s, 11)[name] for s in SPLITS}
    again = build_examples({name: options}, "validation", 11)[name]
    assert again == splits["validation"]
    other_seed = build_examples({name: options}, "validation", 12)[name]
    assert other_seed != splits["validation"]
    inputs = {s: {ex.inputs for ex in splits[s]} for s in SPLITS}
    assert all(len(inputs[s]) == len(splits[s]) for s in SPLITS)  # no duplicates inside a split
    assert not inputs["train"] & inputs["validation"]
    assert not inputs["train"] & inputs["test"]
    assert not inputs["validation"] & inputs["test"]


def test_impossible_generation_fails_clearly():
    with pytest.raises(ValueError, match="could not generate"):
        build_examples({"duplication": {"length": 1, "vocab_size": 2, "num_examples": 5}}, "train", 0)


def test_shipped_params_tasks_build():
    defaults = config_from_dict(shipped_params()).finetune.tasks
    corpus = tiny_corpus()
    for split in SPLITS:
        built = build_examples(defaults, split, 1234, corpus=corpus)
        assert set(built) == set(defaults)
        assert all(len(v) > 0 for v in built.values())


# ------------------------------------------------------------------------------------------ validation


def task_problems(tasks) -> list[str]:
    """The problems the params loader reports under `finetune.tasks` for this mapping of tasks."""
    params = shipped_params()
    params["finetune"]["tasks"] = tasks
    try:
        config_from_dict(params)
    except ConfigError as exc:
        return [p for p in exc.problems if p.startswith("finetune.tasks")]
    return []


def test_task_options_accept_defaults_and_valid_options():
    assert task_problems({"summarize": {}, "listops": None, "duplication": {"length": 8}}) == []
    assert task_problems({"sst2": {"name": None, "max_examples": 10, "path": "/tmp/x"}}) == []
    assert task_problems({"listops": {"leaf_probability": 1}}) == []  # an int is a float


def test_task_option_problems_are_all_reported_with_their_paths():
    problems = task_problems(
        {
            "sumarize": {},
            "listops": {"max_depth": "deep", "max_argz": 3, "num_examples": 0, "leaf_probability": 1.5},
            "duplication": {"length": True, "vocab_size": None},
            "sst2": [1, 2],
        }
    )
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert re.search(r"^finetune\.tasks\.sumarize: unknown task \(did you mean 'summarize'", text, re.M)
    assert "finetune.tasks.listops.max_depth: expected int" in text
    assert re.search(r"finetune\.tasks\.listops\.max_argz: unknown option \(did you mean 'max_args'", text)
    assert "finetune.tasks.listops.num_examples: must be >= 1, got 0" in text
    assert "finetune.tasks.listops.leaf_probability: must be <= 1, got 1.5" in text
    assert "finetune.tasks.duplication.length: expected int" in text  # a bool is not an int
    assert "finetune.tasks.duplication.vocab_size: must not be null" in text
    assert "finetune.tasks.sst2: expected a mapping of options" in text
    assert task_problems({})[0].startswith("finetune.tasks: at least one task is needed")


def test_config_reports_task_problems():
    params = shipped_params()
    params["finetune"]["tasks"] = {"listops": {"max_chars": -1}, "nope": {}}
    with pytest.raises(ConfigError) as err:
        config_from_dict(params)
    assert any(p.startswith("finetune.tasks.listops.max_chars: must be >=") for p in err.value.problems)
    assert any(p.startswith("finetune.tasks.nope: unknown task") for p in err.value.problems)


def test_registry_lookup():
    assert get_task("listops") is TASKS["listops"]
    with pytest.raises(KeyError, match="known tasks"):
        get_task("glue")
    for task in TASKS.values():
        assert task.metric in ("rouge_l", "bleu", "accuracy", "exact_match", "token_accuracy")
        assert task.prefix.endswith(": ")
        assert task.classes is None or task.metric == "accuracy"


# ------------------------------------------------------------------------------------------- mixing


def test_examples_proportional_rates_follow_the_paper():
    # r_m = min(e_m, K) / sum_n min(e_n, K) with K = 500
    rates = mixing_rates({"a": 1000, "b": 100, "c": 10}, "examples_proportional", cap=500)
    total = 500 + 100 + 10
    assert rates == pytest.approx({"a": 500 / total, "b": 100 / total, "c": 10 / total})
    uncapped = mixing_rates({"a": 1000, "b": 100, "c": 10}, "examples_proportional", cap=None)
    assert uncapped == pytest.approx({"a": 1000 / 1110, "b": 100 / 1110, "c": 10 / 1110})


def test_temperature_rates_follow_the_paper():
    # rates raised to 1/T and renormalised: with T = 2, proportional to sqrt(min(e, K))
    rates = mixing_rates({"a": 900, "b": 100, "c": 0}, "temperature", temperature=2.0, cap=10_000)
    assert rates == pytest.approx({"a": 30 / 40, "b": 10 / 40, "c": 0.0})
    assert mixing_rates({"a": 900, "b": 100}, "temperature", temperature=1.0) == pytest.approx({"a": 0.9, "b": 0.1})
    hot = mixing_rates({"a": 900, "b": 100}, "temperature", temperature=1000.0)
    assert hot["a"] == pytest.approx(0.5, abs=0.01)


def test_equal_rates_and_errors():
    assert mixing_rates({"a": 5, "b": 5000, "c": 0}, "equal") == {"a": 0.5, "b": 0.5, "c": 0.0}
    with pytest.raises(ValueError):
        mixing_rates({"a": 0}, "equal")
    with pytest.raises(ValueError):
        mixing_rates({"a": 1}, "temperature", temperature=0.0)
    with pytest.raises(ValueError):
        mixing_rates({"a": 1}, "proportional")


def test_mixture_is_deterministic_and_follows_rates():
    examples = {name: [Example(f"{name} {i}", str(i)) for i in range(n)] for name, n in [("a", 300), ("b", 50)]}
    rates = {"a": 0.25, "b": 0.75}
    mixture = Mixture(examples, rates, seed=3, length=4000)
    assert len(mixture) == 4000
    draws = [mixture[i] for i in range(len(mixture))]
    assert draws == [Mixture(examples, rates, seed=3, length=4000)[i] for i in range(4000)]
    assert draws[:50] != [Mixture(examples, rates, seed=4, length=4000)[i] for i in range(50)]
    share = Counter(name for name, _ in draws)
    assert share["b"] / 4000 == pytest.approx(0.75, abs=0.03)
    for name, ex in draws:
        assert ex in examples[name]
    assert len({ex for name, ex in draws if name == "b"}) == 50  # every example gets drawn
    assert len(Mixture(examples, rates, seed=0)) == 350
    with pytest.raises(IndexError):
        mixture[4000]


# ------------------------------------------------------------------------------------------- metrics

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a stream is returned when the file is opened successfully",
    "return the absolute value of the argument given to the function",
]


@pytest.mark.parametrize("metric", ["rouge_l", "bleu", "accuracy", "exact_match"])
def test_metrics_score_perfect_predictions_one_and_wrong_ones_lower(metric):
    perfect = score(metric, SENTENCES, SENTENCES)
    headline = next(iter(perfect))
    assert headline == metric
    assert perfect[headline] == pytest.approx(1.0)
    partly = score(metric, [SENTENCES[0], SENTENCES[2], "entirely unrelated words here today"], SENTENCES)
    wrong = score(metric, ["zebra " * 5, "yak " * 6, "quux " * 7], SENTENCES)
    assert 0.0 < partly[headline] < 1.0
    assert wrong[headline] == pytest.approx(0.0)
    assert all(0.0 <= v <= 1.0 for v in (*perfect.values(), *partly.values(), *wrong.values()))


def test_accuracy_exact_match_and_f1_equal_torchmetrics():
    import random

    import torch
    from torchmetrics.functional.classification import multiclass_accuracy
    from torchmetrics.functional.text import squad

    rng = random.Random(0)
    words = ["The", "the", "a", "Eiffel", "tower", "Tower,", "Paris!", "an", "apple", "42", "4 2", "-"]
    refs = [" ".join(rng.choices(words, k=rng.randint(1, 5))) for _ in range(200)]
    preds = [r if rng.random() < 0.3 else " ".join(rng.choices(words, k=rng.randint(0, 5))) for r in refs]
    ours = score("exact_match", preds, refs)
    norm = [" ".join(t.split()) for t in preds + refs]
    vocabulary = {t: i for i, t in enumerate(sorted(set(norm)))}
    accuracy = multiclass_accuracy(
        torch.tensor([vocabulary[t] for t in norm[: len(preds)]]),
        torch.tensor([vocabulary[t] for t in norm[len(preds) :]]),
        num_classes=len(vocabulary),
        average="micro",
    )
    assert ours["exact_match"] == pytest.approx(float(accuracy), abs=1e-6)
    assert score("accuracy", preds, refs)["accuracy"] == pytest.approx(float(accuracy), abs=1e-6)
    f1 = squad(
        [{"prediction_text": p, "id": str(i)} for i, p in enumerate(norm[: len(preds)])],
        [{"answers": {"text": [r], "answer_start": [0]}, "id": str(i)} for i, r in enumerate(norm[len(preds) :])],
    )["f1"]
    assert 0.1 < ours["f1"] < 0.9
    assert ours["f1"] == pytest.approx(float(f1) / 100.0, abs=1e-5)


def test_metric_details():
    assert score("accuracy", ["positive", "negative ", "positive"], ["positive", "negative", "negative"]) == {
        "accuracy": pytest.approx(2 / 3)
    }
    em = score("exact_match", ["The Eiffel Tower", "Paris"], ["Eiffel Tower", "Paris"])
    assert em["exact_match"] == pytest.approx(0.5)
    assert em["f1"] == pytest.approx(1.0)  # SQuAD normalisation drops the article
    with pytest.raises(ValueError):
        score("accuracy", ["a"], ["a", "b"])
    with pytest.raises(ValueError):
        score("perplexity", ["a"], ["a"])


# --------------------------------------------------------------------------------------- hub recipes


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def hub_options(tmp_path: Path, directory: Path, **extra) -> dict:
    return {"path": str(directory), "name": None, "cache_dir": str(tmp_path / "hf-cache")} | extra


def test_sst2_recipe_on_a_local_stand_in(tmp_path):
    d = tmp_path / "glue-sst2"

    def rows(split: str, n: int, label) -> list[dict]:
        return [{"sentence": f"{split} sentence {i} ", "label": label(i), "idx": i} for i in range(n)]

    write_jsonl(d / "train.jsonl", rows("train", 12, lambda i: i % 2))
    write_jsonl(d / "validation.jsonl", rows("validation", 10, lambda i: i % 2))
    write_jsonl(d / "test.jsonl", rows("test", 4, lambda i: -1))  # GLUE hides test labels
    opts = hub_options(tmp_path, d)
    built = {s: build_examples({"sst2": opts}, s, 0)["sst2"] for s in SPLITS}
    assert [len(built[s]) for s in SPLITS] == [12, 5, 5]  # validation halves: ours are disjoint
    assert not {e.inputs for e in built["validation"]} & {e.inputs for e in built["test"]}
    ex = built["train"][1]
    assert ex == Example("sst2 sentence: train sentence 1", "positive", label="positive")
    assert {e.label for e in built["train"]} == set(get_task("sst2").classes)
    only_test = build_examples({"sst2": opts | {"test_split": "test"}}, "test", 0)["sst2"]
    assert only_test == []  # unlabeled rows are dropped
    capped = build_examples({"sst2": opts | {"max_examples": 3}}, "train", 0)["sst2"]
    assert len(capped) == 3


def test_squad_recipe_on_a_local_stand_in(tmp_path):
    d = tmp_path / "squad"

    def row(i: int) -> dict:
        return {
            "id": str(i),
            "title": "T",
            "context": f"Context number {i} mentions answer {i}.",
            "question": f"Which answer does context {i} mention?",
            "answers": {"text": [f"answer {i}", f"{i}"], "answer_start": [25, 32]},
        }

    write_jsonl(d / "train.jsonl", [row(i) for i in range(6)])
    write_jsonl(d / "validation.jsonl", [row(i) for i in range(10, 14)])
    examples = build_examples({"squad": hub_options(tmp_path, d)}, "validation", 0)["squad"]
    assert examples == [
        Example(f"question: Which answer does context {i} mention? context: Context number {i} mentions answer {i}.",
                f"answer {i}")
        for i in (10, 11)
    ]  # fmt: skip
    assert get_task("squad").metric == "exact_match"


def test_cnn_dailymail_recipe_on_a_local_stand_in(tmp_path):
    d = tmp_path / "cnn"
    for split in SPLITS:
        write_jsonl(
            d / f"{split}.jsonl",
            [{"article": f" {split} article {i}. More text. ", "highlights": f"{split} highlight {i}", "id": str(i)}
             for i in range(3)],
        )  # fmt: skip
    built = {s: build_examples({"cnn_dailymail": hub_options(tmp_path, d)}, s, 0)["cnn_dailymail"] for s in SPLITS}
    for split in SPLITS:
        assert built[split][2] == Example(f"summarize: {split} article 2. More text.", f"{split} highlight 2")
    assert get_task("cnn_dailymail").metric == "rouge_l"


def test_wmt_recipe_on_a_local_parquet_stand_in(tmp_path):
    d = tmp_path / "wmt14"
    d.mkdir()
    for split in SPLITS:
        rows = {"translation": [{"de": f"Das ist Satz {i} ({split}).", "en": f"This is sentence {i} ({split})."}
                                for i in range(4)]}  # fmt: skip
        datasets.Dataset.from_dict(rows).to_parquet(str(d / f"{split}.parquet"))
    examples = build_examples({"wmt_en_de": hub_options(tmp_path, d)}, "test", 0)["wmt_en_de"]
    assert examples[3] == Example("translate English to German: This is sentence 3 (test).", "Das ist Satz 3 (test).")
    assert get_task("wmt_en_de").metric == "bleu"


def test_listops_at_long_range_arena_scale():
    # LRA's setting (depth 10, up to 10 arguments, digits with probability 0.75), lengths in characters
    options = {"max_depth": 10, "max_args": 10, "leaf_probability": 0.75, "min_chars": 500, "max_chars": 2000}
    examples = build_examples({"listops": options | {"num_eval_examples": 15}}, "validation", 0)["listops"]
    assert len(examples) == 15
    for ex in examples:
        expression = ex.inputs.removeprefix("listops: ")
        assert 500 <= len(expression) <= 2000
        assert ex.targets == str(evaluate_listops(expression))


# ------------------------------------------------------------------------------- LRA ListOps, baselines


def test_lra_listops_follows_the_long_range_arena_specification():
    task = get_task("lra_listops")
    defaults = task.resolve_options()
    assert (defaults["num_examples"], defaults["num_eval_examples"]) == (96_000, 2000)
    assert (defaults["max_depth"], defaults["max_args"], defaults["min_tokens"], defaults["max_tokens"]) == (
        10,
        10,
        500,
        2000,
    )
    assert task.classes == [str(d) for d in range(10)] and task.metric == "accuracy"
    examples = build_examples({"lra_listops": {"num_eval_examples": 12}}, "test", 0)["lra_listops"]
    assert len(examples) == 12
    depths, arities = [], []
    for ex in examples:
        expression = ex.inputs.removeprefix(task.prefix)
        assert 500 <= listops_tokens(expression) <= 2000
        assert ex.targets == ex.label == str(evaluate_listops(expression))
        assert set(re.findall(r"\[(\w+)", expression)) <= {"MAX", "MIN", "MED", "SM"}
        depth = peak = 0
        stack: list[int] = []  # argument counts of the open operators
        for tok in expression.split():
            if tok == "]":
                arities.append(stack.pop())
                depth -= 1
                continue
            if stack:
                stack[-1] += 1
            if tok.startswith("["):
                stack.append(0)
                depth += 1
                peak = max(peak, depth)
        depths.append(peak)
    assert max(depths) <= 9  # depth 10 counts the digits below the deepest operator
    assert min(arities) >= 2 and max(arities) <= 10


def test_example_scores_average_to_the_corpus_score():
    preds = ["4", "7", "4", "x"]
    refs = ["4", "7", "1", "2"]
    assert example_scores("accuracy", preds, refs) == [1.0, 1.0, 0.0, 0.0]
    assert sum(example_scores("accuracy", preds, refs)) / 4 == pytest.approx(score("accuracy", preds, refs)["accuracy"])
    preds = ["the cat sat on the mat", "a b c", ""]
    refs = ["the cat sat", "a c", "nothing here"]
    per = example_scores("rouge_l", preds, refs)
    assert per[0] == pytest.approx(2 * 1.0 * 0.5 / 1.5) and per[2] == 0.0
    assert sum(per) / 3 == pytest.approx(score("rouge_l", preds, refs)["rouge_l"], abs=1e-6)
    with pytest.raises(ValueError, match="predictions"):
        example_scores("accuracy", ["a"], [])


def test_baselines_of_classification_and_generation_tasks():
    listops = get_task("listops")
    train = [Example("listops: [MAX 1 3 ]", "3", "3")] * 3 + [Example("listops: [MIN 1 3 ]", "1", "1")]
    test = [Example("listops: [MAX 2 3 ]", "3", "3"), Example("listops: [MIN 2 3 ]", "2", "2")]
    assert baselines(listops, train, test) == {"majority": 0.5, "chance": 0.1}
    # a copy task scored per symbol: echoing the input is the task itself, so its baselines are a constant symbol
    # and chance over the symbols seen in training
    dup = get_task("duplication")
    test = [Example("duplicate: a b", "a b"), Example("duplicate: c a", "c a")]
    train = [Example("duplicate: a a b", "a a b"), Example("duplicate: c", "c")]
    assert baselines(dup, train, test) == {"most_frequent_symbol": 0.5, "chance": 1 / 3}
    assert example_scores("token_accuracy", ["a b", "a", "", "x y z"], ["a b", "a b", "a", "x q z"]) == [
        1.0, 0.5, 0.0, 2 / 3
    ]  # fmt: skip


def test_sort_targets_are_the_sorted_distinct_digits():
    examples = build_examples({"sort": {"min_length": 3, "max_length": 6, "num_eval_examples": 50}}, "test", 0)["sort"]
    assert len(examples) == 50
    for ex in examples:
        digits = ex.inputs.removeprefix("sort: ").split()
        assert 3 <= len(digits) <= 6 and len(set(digits)) == len(digits)
        assert ex.targets == " ".join(sorted(digits))
    with pytest.raises(ValueError, match="min_length"):
        build_examples({"sort": {"min_length": 5, "max_length": 3}}, "train", 0)


def test_listops_operators_option_restricts_the_operators():
    options = {"max_depth": 2, "max_args": 4, "min_chars": 0, "operators": ["MAX", "MIN"], "num_eval_examples": 40}
    examples = build_examples({"listops": options}, "test", 0)["listops"]
    assert {re.match(r"\[(\w+)", ex.inputs.removeprefix("listops: ")).group(1) for ex in examples} == {"MAX", "MIN"}
    assert all(ex.targets == str(evaluate_listops(ex.inputs.removeprefix("listops: "))) for ex in examples)
    with pytest.raises(ValueError, match="operators"):
        build_examples({"listops": {"operators": ["POW"]}}, "train", 0)


# ------------------------------------------------------------------------------------------------ how many inputs


def _needle_inputs(min_items: int, max_items: int, filler: int) -> set[str]:
    """Every needle input these options allow, by drawing until no new one comes (small spaces only)."""
    import random

    task, seen, rng = TASKS["needle"], set(), random.Random(0)
    options = task.resolve_options({"min_items": min_items, "max_items": max_items, "filler": filler})
    letters = [chr(c) for c in range(ord("a"), ord("a") + filler)]
    for _ in range(200_000):
        items = rng.choices(letters, k=rng.randint(options["min_items"], options["max_items"]))
        items[rng.randrange(len(items))] = str(rng.randrange(10))
        seen.add(" ".join(items))
    return seen


@pytest.mark.parametrize("low,high,filler", [(2, 3, 1), (3, 4, 2), (5, 5, 1)])
def test_the_needle_capacity_counts_every_input_the_options_allow(low, high, filler):
    capacity = TASKS["needle"].capacity({"min_items": low, "max_items": high, "filler": filler})
    assert capacity == len(_needle_inputs(low, high, filler))


def test_the_sort_capacity_counts_the_ordered_digit_draws():
    capacity = TASKS["sort"].capacity({"min_length": 2, "max_length": 3})
    assert capacity == 10 * 9 + 10 * 9 * 8


@pytest.mark.parametrize("task,options", [("needle", {"min_items": 20, "max_items": 24, "filler": 1}),
                                          ("sort", {"min_length": 2, "max_length": 3})])  # fmt: skip
def test_what_passes_the_capacity_check_generates_and_what_fails_it_cannot(task, options):
    from pipeline.data.tasks import split_shortfall

    total = TASKS[task].capacity(TASKS[task].resolve_options(options))
    fits, too_many = int(total / 3 - 4 * (total * 2 / 9) ** 0.5), total // 3 + total // 10  # the check's margin
    assert split_shortfall(task, {**options, "num_examples": fits, "num_eval_examples": 5}) is None
    built = build_examples({task: {**options, "num_examples": fits, "num_eval_examples": 5}}, "train", seed=3)
    assert len({e.inputs for e in built[task]}) == fits
    message = split_shortfall(task, {**options, "num_examples": too_many, "num_eval_examples": 5})
    assert message and f"{total:,} distinct inputs" in message
    with pytest.raises(ValueError, match="could not generate"):
        build_examples({task: {**options, "num_examples": too_many, "num_eval_examples": 5}}, "train", seed=3)


def test_a_lengths_section_that_cannot_generate_its_examples_is_a_params_error():
    raw = yaml.safe_load(PARAMS.read_text())
    raw["lengths"]["seq_lengths"] = [64, 512]  # 58 to 62 symbols of one filler letter: 3,000 inputs in all splits
    with pytest.raises(
        ConfigError, match=r"lengths: task_options at length 64 .*3,000 distinct inputs, about 1,000 per split"
    ):
        config_from_dict(raw)
    raw["lengths"]["task_options"]["num_examples"] = 800
    assert config_from_dict(raw).lengths.seq_lengths == [64, 512]


def test_a_finetune_task_that_cannot_generate_its_examples_is_a_params_error():
    raw = yaml.safe_load(PARAMS.read_text())
    raw["finetune"]["tasks"]["sort"] = {"min_length": 2, "max_length": 2, "num_examples": 500}
    with pytest.raises(ConfigError, match=r"finetune.tasks.sort: task sort: these options allow 90 distinct"):
        config_from_dict(raw)
