"""The statistics behind the comparison: intervals, paired differences, trivial baselines, collapse, verdicts.

Two sources of variation make a number uncertain:
- the **seed** (initialisation, data order, LSH rotations): a Student-t interval over the per-seed values
  (`t_interval`, and `difference_interval` for two variants, paired by seed where both ran the same seeds);
- the **test examples** (a finite test set): a bootstrap over examples.
Task metrics have both, so `bootstrap_interval` and `bootstrap_difference` resample seeds and then the test
examples within each seed (a two-level bootstrap; with one seed only the examples). Differences between two
variants reuse the same seeds and the same example indices for both, because both were scored on the same
test examples: the pairing removes the shared difficulty of each example from the interval.

A **verdict** names a winner only where the interval of the difference excludes zero; a **collapsed** variant
(constant predictions, or a score not beyond the trivial baseline with its interval) never ties: it loses to
any variant that did not collapse. Nothing here prints a ratio: differences are reported in the metric's own
units, so two numbers near zero cannot turn into a large "win".
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

CONFIDENCE = 0.95
N_RESAMPLES = 4000
NO_DIFFERENCE = "no significant difference at this budget"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval (`low`/`high` None where there is none, e.g. one seed).

    `n` is the number of seeds behind the estimate; `method` says how the interval was obtained.
    """

    mean: float
    low: float | None
    high: float | None
    n: int
    method: str

    @property
    def has_interval(self) -> bool:
        return self.low is not None and self.high is not None

    def excludes(self, value: float = 0.0) -> bool:
        """True when the interval lies entirely on one side of `value` (False without an interval)."""
        return self.has_interval and (self.low > value or self.high < value)  # type: ignore[operator]

    def above(self, value: float) -> bool:
        """Entirely above `value`; without an interval, the point estimate decides."""
        return (self.low if self.has_interval else self.mean) > value  # type: ignore[operator]

    def below(self, value: float) -> bool:
        """Entirely below `value`; without an interval, the point estimate decides."""
        return (self.high if self.has_interval else self.mean) < value  # type: ignore[operator]

    def format(self, digits: int = 3) -> str:
        """`0.512 [0.470, 0.551]`, or `0.512` without an interval."""
        if not self.has_interval:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict[str, float | int | str | None]:
        return asdict(self)


def _finite(values: Iterable[float]) -> np.ndarray:
    out = np.asarray([float(v) for v in values], dtype=np.float64)
    if out.size == 0:
        raise ValueError("no values to summarise")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"non-finite values cannot be summarised: {out.tolist()}")
    return out


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE, lower: float | None = None) -> Interval:
    """Mean and Student-t interval over per-seed values; one value gives the mean without an interval. `lower`: the
    least value the quantity can take (0 for a time, a speed, a loss), where the interval is cut: three training
    times of 265, 310 and 646 s have a t interval reaching -110 s."""
    from scipy import stats

    x = _finite(values)
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, None, None, 1, "one seed: no interval")
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    low = mean - half if lower is None else max(lower, mean - half)
    return Interval(mean, low, mean + half, int(x.size), f"t over {x.size} seeds")


def difference_interval(a: Mapping[int, float], b: Mapping[int, float], confidence: float = CONFIDENCE) -> Interval:
    """Interval of mean(a) - mean(b) from per-seed values (seed -> value).

    Paired by seed (a t-interval of the per-seed differences) when both ran at least two common seeds;
    otherwise Welch's unpaired interval when each has two seeds or more; otherwise no interval.
    """
    from scipy import stats

    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        d = t_interval([a[s] - b[s] for s in common], confidence)
        return Interval(d.mean, d.low, d.high, d.n, f"paired t over {d.n} seeds")
    xa, xb = _finite(a.values()), _finite(b.values())
    mean = float(xa.mean() - xb.mean())
    if xa.size < 2 or xb.size < 2:
        return Interval(mean, None, None, min(xa.size, xb.size), "one seed: no interval")
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Interval(mean, mean, mean, min(xa.size, xb.size), "Welch t (no spread)")
    dof = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, dof) * se)
    return Interval(mean, mean - half, mean + half, min(xa.size, xb.size), "Welch t, unpaired")


def _two_level_means(per_seed: Sequence[np.ndarray], rng: np.random.Generator, n_resamples: int) -> np.ndarray:
    """Bootstrap distribution of the mean over seeds of the mean over examples: seeds resampled (when there
    are two or more), then examples within each drawn seed. Shape (n_resamples,)."""
    per_seed_means = np.empty((n_resamples, len(per_seed)))
    for j, scores in enumerate(per_seed):  # each seed's example means, once per resample
        idx = rng.integers(0, scores.size, size=(n_resamples, scores.size))
        per_seed_means[:, j] = scores[idx].mean(axis=1)
    if len(per_seed) == 1:
        return per_seed_means[:, 0]
    pick = rng.integers(0, len(per_seed), size=(n_resamples, len(per_seed)))
    return np.take_along_axis(per_seed_means, pick, axis=1).mean(axis=1)


def bootstrap_interval(
    per_seed: Sequence[Sequence[float]],
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Mean and percentile-bootstrap interval of a per-example score (accuracy: 0/1 per example) measured
    for several seeds: `per_seed[i]` holds seed i's per-example scores."""
    arrays = [_finite(s) for s in per_seed]
    if not arrays:
        raise ValueError("no seeds to summarise")
    mean = float(np.mean([a.mean() for a in arrays]))
    draws = _two_level_means(arrays, np.random.default_rng(seed), n_resamples)
    low, high = np.quantile(draws, [(1 - confidence) / 2, (1 + confidence) / 2])
    what = "examples" if len(arrays) == 1 else f"{len(arrays)} seeds and examples"
    return Interval(mean, float(low), float(high), len(arrays), f"bootstrap over {what}")


def bootstrap_difference(
    a: Mapping[int, Sequence[float]],
    b: Mapping[int, Sequence[float]],
    confidence: float = CONFIDENCE,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
) -> Interval:
    """Interval of mean(a) - mean(b) for per-example scores (seed -> scores of the same test examples).

    Paired where possible: on the seeds both ran, with the same example count, the per-example differences
    are bootstrapped (same seeds, same example indices for both); otherwise each side is bootstrapped on its
    own and the draws subtracted.
    """
    common = sorted(s for s in set(a) & set(b) if len(a[s]) == len(b[s]))
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - confidence) / 2, (1 + confidence) / 2
    if common:
        diffs = [_finite(a[s]) - _finite(b[s]) for s in common]
        mean = float(np.mean([d.mean() for d in diffs]))
        draws = _two_level_means(diffs, rng, n_resamples)
        what = "examples" if len(common) == 1 else f"{len(common)} seeds and examples"
        method = f"paired bootstrap over {what}"
        n = len(common)
    else:
        xa, xb = [_finite(v) for v in a.values()], [_finite(v) for v in b.values()]
        mean = float(np.mean([x.mean() for x in xa]) - np.mean([x.mean() for x in xb]))
        draws = _two_level_means(xa, rng, n_resamples) - _two_level_means(xb, rng, n_resamples)
        method, n = "unpaired bootstrap", min(len(xa), len(xb))
    low, high = np.quantile(draws, [lo_q, hi_q])
    return Interval(mean, float(low), float(high), n, method)


# ------------------------------------------------------------------------------------------- baselines


def majority_class(train_labels: Sequence[str]) -> str:
    """The most frequent training label (ties broken by the label's sort order, so the choice is stable)."""
    if not train_labels:
        raise ValueError("no training labels")
    counts = Counter(train_labels)
    return min(counts, key=lambda label: (-counts[label], label))


def majority_baseline(train_labels: Sequence[str], test_labels: Sequence[str]) -> float:
    """Test accuracy of always answering the training majority class."""
    if not test_labels:
        raise ValueError("no test labels")
    label = majority_class(train_labels)
    return sum(t == label for t in test_labels) / len(test_labels)


def chance_baseline(num_classes: int) -> float:
    """Expected accuracy of a uniform random guess."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return 1.0 / num_classes


def unigram_cross_entropy(
    train_tokens: Iterable[int], test_tokens: Iterable[int], vocab_size: int, smoothing: float = 0.5
) -> float:
    """Cross-entropy (nats per token) of the test tokens under the training unigram distribution with additive
    smoothing: the loss of a model that ignores its input, the trivial baseline for a language-model loss."""
    counts = np.bincount(np.asarray(list(train_tokens), dtype=np.int64), minlength=vocab_size).astype(np.float64)
    test = np.asarray(list(test_tokens), dtype=np.int64)
    if test.size == 0:
        raise ValueError("no test tokens")
    if counts.size > vocab_size or test.max() >= vocab_size:
        raise ValueError(f"token ids must be < vocab_size {vocab_size}")
    probs = (counts + smoothing) / (counts.sum() + smoothing * vocab_size)
    return float(-np.log(probs[test]).mean())


# -------------------------------------------------------------------------------------------- collapse


@dataclass(frozen=True)
class Collapse:
    """Whether a variant collapsed on one metric, and why (empty reason when it did not)."""

    collapsed: bool
    reason: str = ""


def constant_predictions(predictions: Sequence[str]) -> bool:
    """True when every prediction is the same string (whitespace-normalised); needs two predictions or more."""
    return len(predictions) >= 2 and len({" ".join(p.split()) for p in predictions}) == 1


def check_collapse(
    score: Interval,
    baseline: float | None,
    higher_is_better: bool = True,
    predictions_per_seed: Sequence[Sequence[str]] | None = None,
) -> Collapse:
    """Collapsed when the predictions are constant in every seed, or when the score is not beyond the
    trivial baseline with its interval (its mean when there is no interval)."""
    if predictions_per_seed and all(constant_predictions(p) for p in predictions_per_seed):
        first = " ".join(predictions_per_seed[0][0].split()) if predictions_per_seed[0] else ""
        return Collapse(True, f"constant prediction {first[:40]!r} for every example")
    if baseline is None:
        return Collapse(False)
    beyond = score.above(baseline) if higher_is_better else score.below(baseline)
    if not beyond:
        side = "above" if higher_is_better else "below"
        shown = score.format() if score.has_interval else f"{score.mean:.3f}"
        return Collapse(True, f"{shown} not {side} the trivial baseline {baseline:.3f}")
    return Collapse(False)


# --------------------------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Verdict:
    """The outcome of comparing two variants on one metric.

    `kind`: `significant` (a winner, the interval excludes zero), `collapsed` (one collapsed: the other wins),
    `both_collapsed`, `not_significant` or `no_interval` (no winner).
    """

    winner: str | None
    kind: str
    text: str

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)


def decide(
    a: str,
    b: str,
    diff: Interval,
    higher_is_better: bool,
    collapsed: Mapping[str, bool] | None = None,
    digits: int = 3,
) -> Verdict:
    """Verdict for `a` versus `b` given the interval of `a - b`.

    A collapsed variant loses to one that did not collapse, whatever the numbers; otherwise a winner is named
    only when the interval excludes zero, and the text gives the difference in the metric's units.
    """
    collapsed = collapsed or {}
    ca, cb = bool(collapsed.get(a)), bool(collapsed.get(b))
    if ca and cb:
        return Verdict(None, "both_collapsed", "both collapsed (neither beats the trivial baseline)")
    if ca or cb:
        winner, loser = (b, a) if ca else (a, b)
        return Verdict(winner, "collapsed", f"{winner} ({loser} collapsed)")
    if not diff.has_interval:
        text = f"no winner named: one seed gives no interval (difference {diff.mean:+.{digits}f})"
        return Verdict(None, "no_interval", text)
    if not diff.excludes(0.0):
        return Verdict(None, "not_significant", f"{NO_DIFFERENCE} (difference {diff.format(digits)})")
    a_better = (diff.mean > 0) == higher_is_better
    winner, loser = (a, b) if a_better else (b, a)
    size = abs(diff.mean)
    low, high = sorted((abs(diff.low), abs(diff.high)))  # type: ignore[arg-type]
    word = "higher" if higher_is_better else "lower"
    text = f"{winner}, {word} by {size:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] than {loser}"
    return Verdict(winner, "significant", text)
