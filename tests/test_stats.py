"""pipeline/report/stats.py: intervals over seeds and examples, paired differences, baselines, collapse, verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.report.stats import (
    NO_DIFFERENCE,
    Interval,
    bootstrap_difference,
    bootstrap_interval,
    chance_baseline,
    check_collapse,
    constant_predictions,
    decide,
    difference_interval,
    majority_baseline,
    majority_class,
    t_interval,
    unigram_cross_entropy,
)


def test_t_interval_matches_the_textbook_value():
    iv = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 * 1.0 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert iv.mean == pytest.approx(2.0)
    assert (iv.low, iv.high) == pytest.approx((2.0 - half, 2.0 + half))
    assert iv.n == 3 and "3 seeds" in iv.method


def test_one_seed_gives_no_interval_and_says_so():
    iv = t_interval([0.7])
    assert iv.mean == 0.7 and not iv.has_interval and "one seed" in iv.method
    assert not iv.excludes(0.0)
    assert iv.format() == "0.700"
    d = difference_interval({0: 0.9}, {0: 0.1})
    assert d.mean == pytest.approx(0.8) and not d.has_interval


def test_non_finite_values_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        t_interval([])


def test_pairing_by_seed_removes_the_shared_seed_effect():
    # the seed moves both variants together; a is always 0.1 better: paired interval excludes zero
    base = {0: 0.2, 1: 0.5, 2: 0.8}
    a = {s: v + 0.1 for s, v in base.items()}
    paired = difference_interval(a, base)
    assert "paired" in paired.method and paired.excludes(0.0)
    assert paired.mean == pytest.approx(0.1)
    unpaired = difference_interval({10 + s: v for s, v in a.items()}, base)  # no common seed: Welch
    assert "Welch" in unpaired.method and not unpaired.excludes(0.0)


def test_bootstrap_interval_over_examples_and_seeds():
    rng = np.random.default_rng(0)
    sure = bootstrap_interval([[1.0] * 50])
    assert (sure.low, sure.high) == (1.0, 1.0)
    coin = bootstrap_interval([rng.integers(0, 2, 400).tolist()])
    assert coin.low < coin.mean < coin.high
    assert 0.05 < coin.high - coin.low < 0.15  # about 2 * 1.96 * sqrt(0.25 / 400) = 0.098
    # seeds that disagree widen the interval beyond the example-level one
    spread = bootstrap_interval([[0.0] * 200 + [1.0] * 200, [1.0] * 360 + [0.0] * 40, [0.0] * 360 + [1.0] * 40])
    assert spread.n == 3 and "3 seeds" in spread.method
    assert spread.high - spread.low > 0.3


def test_bootstrap_difference_is_paired_on_the_same_examples():
    rng = np.random.default_rng(1)
    difficulty = rng.random(300)
    a = {0: (difficulty > 0.3).astype(float).tolist()}  # a solves every example b solves, and a few more
    b = {0: (difficulty > 0.4).astype(float).tolist()}
    paired = bootstrap_difference(a, b)
    assert "paired" in paired.method
    assert paired.excludes(0.0) and paired.mean > 0
    unpaired = bootstrap_difference(a, {1: b[0]})  # different seeds: no pairing possible
    assert "unpaired" in unpaired.method
    assert unpaired.high - unpaired.low > paired.high - paired.low
    same = bootstrap_difference(a, a)
    assert (same.low, same.high) == (0.0, 0.0) and not same.excludes(0.0)


def test_baselines():
    assert majority_class(["3", "1", "3", "1", "2"]) == "1"  # tie broken by label order
    assert majority_baseline(["a", "a", "b"], ["a", "b", "b", "b"]) == pytest.approx(0.25)
    assert chance_baseline(10) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        chance_baseline(0)
    vocab = 16
    uniform = list(range(vocab)) * 10
    assert unigram_cross_entropy(uniform, uniform, vocab) == pytest.approx(math.log(vocab))
    peaked = [3] * 100
    assert unigram_cross_entropy(peaked, [3] * 10, vocab) < 0.2
    assert unigram_cross_entropy(peaked, [4] * 10, vocab) > math.log(vocab)  # unseen token: smoothing only
    with pytest.raises(ValueError, match="vocab_size"):
        unigram_cross_entropy([1], [99], vocab)


def test_collapse_constant_predictions_or_no_better_than_baseline():
    good = Interval(0.6, 0.5, 0.7, 3, "t")
    assert constant_predictions(["7", " 7", "7 "]) and not constant_predictions(["7"])
    c = check_collapse(good, 0.2, predictions_per_seed=[["7", "7", "7"], ["7", "7"]])
    assert c.collapsed and "constant" in c.reason
    assert not check_collapse(good, 0.2, predictions_per_seed=[["7", "7"], ["1", "7"]]).collapsed
    straddles = Interval(0.25, 0.15, 0.35, 3, "t")
    c = check_collapse(straddles, 0.2)
    assert c.collapsed and "baseline 0.200" in c.reason
    # a loss (lower is better) must be below the baseline with its interval
    assert check_collapse(Interval(4.0, 3.9, 4.1, 3, "t"), 5.0, higher_is_better=False) == check_collapse(good, 0.2)
    assert check_collapse(Interval(4.0, 3.9, 5.1, 3, "t"), 5.0, higher_is_better=False).collapsed
    assert check_collapse(Interval(4.0, None, None, 1, "one seed"), 5.0, higher_is_better=False).collapsed is False


def test_verdict_names_a_winner_only_when_the_interval_excludes_zero():
    sig = decide("t5", "reformer", Interval(-0.2, -0.3, -0.1, 3, "t"), higher_is_better=False)
    assert sig.winner == "t5" and sig.kind == "significant"
    assert "lower by 0.200 [0.100, 0.300]" in sig.text and "x" not in sig.text.replace("than", "")
    flip = decide("t5", "reformer", Interval(-0.2, -0.3, -0.1, 3, "t"), higher_is_better=True)
    assert flip.winner == "reformer"
    tie = decide("t5", "reformer", Interval(0.01, -0.05, 0.07, 3, "t"), higher_is_better=True)
    assert tie.winner is None and tie.text.startswith(NO_DIFFERENCE)
    one = decide("t5", "reformer", Interval(0.5, None, None, 1, "one seed"), higher_is_better=True)
    assert one.winner is None and one.kind == "no_interval"


def test_a_collapsed_variant_never_ties_it_loses():
    tiny_gap = Interval(0.001, -0.01, 0.012, 3, "t")  # would be "no significant difference"
    v = decide("t5", "reformer", tiny_gap, True, collapsed={"t5": True, "reformer": False})
    assert v.winner == "reformer" and v.kind == "collapsed" and "t5 collapsed" in v.text
    # even when the collapsed one has the better number
    v = decide("t5", "reformer", Interval(0.3, 0.2, 0.4, 3, "t"), True, collapsed={"t5": True})
    assert v.winner == "reformer"
    both = decide("t5", "reformer", tiny_gap, True, collapsed={"t5": True, "reformer": True})
    assert both.winner is None and both.kind == "both_collapsed"


def test_t_interval_of_a_non_negative_quantity_stops_at_zero():
    times = [265.2, 309.6, 646.1]  # seconds of training of three seeds, one of them slowed by a neighbour
    assert t_interval(times).low < 0
    cut = t_interval(times, lower=0.0)
    assert (cut.low, cut.high, cut.mean) == (0.0, t_interval(times).high, t_interval(times).mean)
    assert t_interval([1.0, 1.1, 1.2], lower=0.0) == t_interval([1.0, 1.1, 1.2])  # nothing to cut
