"""The tasks' metrics, per example and over a test set, and their trivial baselines (what a model that learned
nothing reaches): the numbers `evaluate`, `lengths` and `compare` score predictions with.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from pipeline.data.tasks import METRICS, Example, Task


def _normalize_space(text: str) -> str:
    return " ".join(text.split())


_ARTICLES = re.compile(r"\b(a|an|the)\b")


_PUNCTUATION = frozenset(string.punctuation)


def _squad_tokens(text: str) -> list[str]:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, words split on whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return _ARTICLES.sub(" ", text).split()


def squad_f1(prediction: str, reference: str) -> float:
    """Token-overlap F1 of one answer against one reference, after SQuAD's normalisation."""
    pred, ref = _squad_tokens(prediction), _squad_tokens(reference)
    if not pred or not ref:  # an answer that normalises to nothing is right only against another such answer
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def score(metric: str, predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus-level scores in [0, 1]; the first key is the metric's headline number.

    - `rouge_l`: ROUGE-L F-measure (plus precision and recall), averaged over examples, no stemming (torchmetrics);
    - `bleu`: SacreBLEU (13a tokenisation, 4-grams, corpus level, no smoothing) (torchmetrics);
    - `accuracy`: fraction of predictions equal to the reference class (whitespace-normalised);
    - `exact_match`: fraction of predictions equal to the reference (whitespace-normalised), plus `f1`:
      SQuAD v1.1's token-overlap F1 (lower-cased, punctuation and articles removed).

    Accuracy, exact match and F1 are counted here, not through torchmetrics: importing torchmetrics costs an
    evaluation stage about 6 s (it imports `transformers` and `scipy.signal` whenever they are installed), a third
    of the stage on the default tasks, for a mean of string equalities. `tests/test_tasks.py` checks them against
    torchmetrics' `multiclass_accuracy` and `squad`.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("nothing to score")
    preds = [_normalize_space(p) for p in predictions]
    refs = [_normalize_space(r) for r in references]
    if metric == "rouge_l":
        from torchmetrics.functional.text.rouge import rouge_score

        s = rouge_score(preds, refs, rouge_keys="rougeL", use_stemmer=False)
        return {
            "rouge_l": float(s["rougeL_fmeasure"]),
            "rouge_l_precision": float(s["rougeL_precision"]),
            "rouge_l_recall": float(s["rougeL_recall"]),
        }
    if metric == "bleu":
        from torchmetrics.functional.text import sacre_bleu_score

        return {"bleu": float(sacre_bleu_score(preds, [[r] for r in refs], tokenize="13a"))}
    if metric in ("accuracy", "exact_match"):
        accuracy = sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
        if metric == "accuracy":
            return {"accuracy": accuracy}
        f1 = sum(squad_f1(p, r) for p, r in zip(preds, refs, strict=True)) / len(refs)
        return {"exact_match": accuracy, "f1": f1}
    if metric == "token_accuracy":
        per = example_scores(metric, predictions, references)
        exact = sum(p == r for p, r in zip(preds, refs, strict=True)) / len(refs)
        return {"token_accuracy": sum(per) / len(per), "exact_match": exact}
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def token_accuracy(prediction: str, reference: str) -> float:
    """The fraction of the reference's whitespace-separated tokens the prediction has at the same position (the
    Reformer paper's accuracy on the copied half, Table 2, for generated text); 1.0 for two empty strings."""
    pred, ref = prediction.split(), reference.split()
    if not ref:
        return float(not pred)
    return sum(p == r for p, r in zip(pred, ref, strict=False)) / len(ref)


def example_scores(metric: str, predictions: list[str], references: list[str]) -> list[float]:
    """One score per example, in [0, 1], whose mean is the corpus score of `score` for accuracy, exact match
    and ROUGE-L (what the bootstrap over test examples resamples); for BLEU, sentence-level SacreBLEU (its
    mean approximates, and does not equal, corpus BLEU)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    preds = [_normalize_space(p) for p in predictions]
    refs = [_normalize_space(r) for r in references]
    if metric in ("accuracy", "exact_match"):
        return [float(p == r) for p, r in zip(preds, refs, strict=True)]
    if metric == "token_accuracy":
        return [token_accuracy(p, r) for p, r in zip(preds, refs, strict=True)]
    if metric == "rouge_l":
        from torchmetrics.functional.text.rouge import rouge_score

        return [
            float(rouge_score([p], [r], rouge_keys="rougeL", use_stemmer=False)["rougeL_fmeasure"])
            for p, r in zip(preds, refs, strict=True)
        ]
    if metric == "bleu":
        from torchmetrics.functional.text import sacre_bleu_score

        return [float(sacre_bleu_score([p], [[r]], tokenize="13a")) for p, r in zip(preds, refs, strict=True)]
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def baselines(task: Task, train: list[Example], test: list[Example]) -> dict[str, float]:
    """The task's trivial baselines on `test`, in the task's metric: what a model that learned nothing reaches.

    - classification (`task.classes`): `majority` (always the most frequent training label) and `chance`
      (a uniform guess over the classes);
    - generation: `copy_input` (the input without its prefix, echoed) and `most_frequent_output` (always the
      most frequent training target);
    - copy tasks scored per token (`token_accuracy`): `most_frequent_symbol` (the most frequent training symbol at
      every position) and `chance` (a uniform guess over the symbols seen in training).
    """
    import numpy as np

    from pipeline.report.stats import chance_baseline, majority_baseline

    if not test:
        raise ValueError(f"task {task.name}: no test examples for the baselines")
    refs = [x.targets for x in test]
    if task.classes:
        labels = [x.label if x.label is not None else x.targets for x in train] or refs
        return {
            "majority": majority_baseline([_normalize_space(t) for t in labels], [_normalize_space(r) for r in refs]),
            "chance": chance_baseline(len(task.classes)),
        }
    from pipeline.report.stats import majority_class

    if task.metric == "token_accuracy":  # a copy task: echoing the input is the task itself, not a baseline
        symbols = [t for x in train for t in x.targets.split()] or [t for r in refs for t in r.split()]
        frequent = majority_class(symbols)
        repeated = [" ".join([frequent] * len(r.split())) for r in refs]
        return {
            "most_frequent_symbol": float(np.mean(example_scores(task.metric, repeated, refs))),
            "chance": chance_baseline(len(set(symbols))),
        }
    copied = [x.inputs.removeprefix(task.prefix) for x in test]
    frequent = majority_class([_normalize_space(x.targets) for x in train] or refs)
    return {
        "copy_input": float(np.mean(example_scores(task.metric, copied, refs))),
        "most_frequent_output": float(np.mean(example_scores(task.metric, [frequent] * len(refs), refs))),
    }
