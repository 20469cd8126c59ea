"""ALE formulas against values computed by hand (natural log, sigmoid vectors normalised to sum 1)."""

import math
from pathlib import Path

import numpy as np
import pytest

from ale_backend import scoring, uncertainty
from ale_backend.scoring import (
    PAPER_STRATEGIES,
    STRATEGIES,
    Strategy,
    cannot_rank,
    priority,
    score_image,
    score_images,
)

# Three detections with raw (sigmoid) class scores; normalised rows are [.25 .75], [.5 .5], [1 0].
IMAGE = np.array([[0.2, 0.6], [0.5, 0.5], [0.9, 0.0]])
H1 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0.562335...
H2 = math.log(2)
ENTROPIES = [H1, H2, 0.0]
LCS = [1 - (0.75 - 0.25), 1 - (0.5 - 0.5), 1 - (1.0 - 0.0)]  # 0.5, 1, 0
UNKNOWNS = [1 - 0.6, 1 - 0.5, 1 - 0.9]  # 1 - the highest raw score: 0.4, 0.5, 0.1


def test_normalize_scales_rows_and_makes_empty_evidence_uniform():
    p = uncertainty.normalize(np.array([[0.2, 0.6], [0.0, 0.0], [3.0, 1.0]]))
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.5, 0.5], [0.75, 0.25]])


@pytest.mark.parametrize("bad", [np.array([[-0.1, 0.5]]), np.array([[np.nan, 0.5]]), np.zeros((2, 0)), np.ones(3)])
def test_normalize_rejects_invalid_scores(bad):
    with pytest.raises(ValueError):
        uncertainty.normalize(bad)


def test_entropy_matches_hand_values():
    p = uncertainty.normalize(IMAGE)
    np.testing.assert_allclose(uncertainty.entropy(p), ENTROPIES, atol=1e-12)


def test_least_confidence_matches_hand_values():
    p = uncertainty.normalize(IMAGE)
    np.testing.assert_allclose(uncertainty.least_confidence(p), LCS, atol=1e-12)


def test_unknown_is_one_minus_the_highest_raw_score():
    np.testing.assert_allclose(uncertainty.unknown(IMAGE), UNKNOWNS, atol=1e-12)


def test_normalising_hides_a_box_that_is_no_known_class_and_unknown_does_not():
    """An unseen species: every class score low. Normalised, it looks like a confident known object."""
    known = np.array([[0.9, 0.1, 0.1]])
    unseen = np.array([[0.09, 0.01, 0.01]])  # the same shape, ten times lower
    assert score_image(unseen, "entropy-sum") == pytest.approx(score_image(known, "entropy-sum"))
    assert score_image(unseen, "lc-max") == pytest.approx(score_image(known, "lc-max"))
    assert score_image(unseen, "unknown-sum") == pytest.approx(0.91)
    assert score_image(known, "unknown-sum") == pytest.approx(0.1)


@pytest.mark.parametrize("bad", [np.array([[1.2, 0.5]]), np.array([[-0.1, 0.5]]), np.array([[np.inf, 0.1]]),
                                 np.zeros((2, 0)), np.ones(3)])
def test_unknown_rejects_scores_that_are_not_sigmoids(bad):
    with pytest.raises(ValueError):
        uncertainty.unknown(bad)


def test_ties_between_top_classes_are_maximally_uncertain_for_lc():
    p = uncertainty.normalize(np.array([[0.4, 0.4, 0.2]]))
    assert uncertainty.least_confidence(p)[0] == pytest.approx(1.0)
    expected = -(2 * 0.4 * math.log(0.4) + 0.2 * math.log(0.2))
    assert uncertainty.entropy(p)[0] == pytest.approx(expected)


def test_single_class_detections_are_certain():
    scores = np.array([[0.3], [0.9]])
    for strategy in ("entropy-sum", "lc-max", "ale-entropy-sum", "ale-lc-mean"):
        assert score_image(scores, strategy) == 0.0
    assert score_image(scores, "count") == 2.0


@pytest.mark.parametrize(
    "strategy, expected",
    [
        ("entropy-sum", H1 + H2),
        ("entropy-mean", (H1 + H2) / 3),
        ("entropy-max", H2),
        ("lc-sum", 1.5),
        ("lc-mean", 0.5),
        ("lc-max", 1.0),
        ("ale-entropy-sum", (H1 + H2) * math.sqrt(3)),
        ("ale-entropy-mean", (H1 + H2) / 3 * math.sqrt(3)),
        ("ale-entropy-max", H2 * math.sqrt(3)),
        ("ale-lc-sum", 1.5 * math.sqrt(3)),
        ("ale-lc-mean", 0.5 * math.sqrt(3)),
        ("ale-lc-max", math.sqrt(3)),
        ("unknown-sum", 1.0),
        ("unknown-mean", 1.0 / 3),
        ("unknown-max", 0.5),
        ("ale-unknown-sum", math.sqrt(3)),
        ("ale-unknown-mean", math.sqrt(3) / 3),
        ("ale-unknown-max", 0.5 * math.sqrt(3)),
        ("count", 3.0),
    ],
)
def test_image_scores_match_hand_values(strategy, expected):
    assert score_image(IMAGE, strategy) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s.startswith("ale-")])
def test_ale_is_the_plain_strategy_times_sqrt_n(strategy):
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 9):
        scores = rng.random((n, 4))
        plain = score_image(scores, strategy.removeprefix("ale-"))
        assert score_image(scores, strategy) == pytest.approx(plain * math.sqrt(n))


def test_one_detection_ale_equals_plain():
    scores = np.array([[0.2, 0.6]])
    assert score_image(scores, "ale-entropy-max") == pytest.approx(H1)
    assert score_image(scores, "ale-lc-sum") == pytest.approx(0.5)


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "random"])
@pytest.mark.parametrize("empty", [np.zeros((0, 5)), np.array([]), []])
def test_no_detection_scores_zero(strategy, empty):
    assert score_image(empty, strategy) == 0.0


def test_ale_prefers_more_objects_at_equal_uncertainty():
    one = np.array([[0.5, 0.5]])
    four = np.repeat(one, 4, axis=0)
    assert score_image(four, "ale-entropy-mean") == pytest.approx(2 * score_image(one, "ale-entropy-mean"))
    assert score_image(four, "entropy-mean") == pytest.approx(score_image(one, "entropy-mean"))


def test_random_is_seeded_and_ignores_detections():
    a = score_image(IMAGE, "random", np.random.default_rng(3))
    b = score_image(np.zeros((0, 2)), "random", np.random.default_rng(3))
    assert a == b and 0.0 <= a < 1.0
    assert score_image(IMAGE, "random", np.random.default_rng(4)) != a


def test_power_sampling_draws_images_in_proportion_to_their_score():
    """Ranked by score * exp(Gumbel), an image comes first with probability score / total (a draw without
    replacement in proportion to the scores), where plain ranking always puts the highest first; an image without
    detections stays at 0; a seeded draw is the same draw."""
    low, high = np.array([[0.9, 0.0]]), np.array([[0.7, 0.0]])  # unknown-max: 0.1 and 0.3
    rng = np.random.default_rng(0)
    first = [score_image(high, "power-unknown-max", rng) > score_image(low, "power-unknown-max", rng)
             for _ in range(4000)]
    assert np.mean(first) == pytest.approx(0.75, abs=0.025)
    three = [np.array([[1 - s, 0.0]]) for s in (0.1, 0.2, 0.5)]
    leaders = [int(np.argmax(score_images(three, "power-unknown-max", rng))) for _ in range(4000)]
    np.testing.assert_allclose(np.bincount(leaders, minlength=3) / 4000, [0.125, 0.25, 0.625], atol=0.025)
    assert score_image(np.zeros((0, 2)), "power-ale-unknown-mean", rng) == 0.0
    seeded = [score_image(IMAGE, "power-ale-unknown-mean", np.random.default_rng(5)) for _ in range(2)]
    assert seeded[0] == seeded[1] != score_image(IMAGE, "power-ale-unknown-mean", np.random.default_rng(6))


def test_score_images_scores_each_image():
    images = [IMAGE, np.zeros((0, 2)), IMAGE[:1]]
    np.testing.assert_allclose(score_images(images, "ale-lc-sum"), [1.5 * math.sqrt(3), 0.0, 0.5])


def test_strategy_names_cover_the_paper_first_then_the_additions():
    assert len(PAPER_STRATEGIES) == 14 and STRATEGIES[:14] == PAPER_STRATEGIES  # the paper's keep their order
    assert not any("unknown" in s for s in PAPER_STRATEGIES)
    unknown = ("unknown-sum", "unknown-mean", "unknown-max", "ale-unknown-sum", "ale-unknown-mean", "ale-unknown-max")
    assert STRATEGIES[14:] == (*unknown, *(f"power-{name}" for name in unknown))
    assert len(set(STRATEGIES)) == 26
    assert Strategy.parse("power-ale-unknown-mean") == Strategy("power-ale-unknown-mean", "unknown", "mean", True,
                                                                power=True)
    assert Strategy.parse("ale-entropy-sum") == Strategy("ale-entropy-sum", "entropy", "sum", True)
    assert Strategy.parse("lc-max") == Strategy("lc-max", "lc", "max", False)
    assert Strategy.parse("ale-unknown-mean") == Strategy("ale-unknown-mean", "unknown", "mean", True)
    with pytest.raises(ValueError, match="ale-entropy-sum"):
        Strategy.parse("ale-count")


def test_priority_decreases_with_the_score_and_stays_in_unit_interval():
    assert priority(1.0) == pytest.approx(0.5)
    assert priority(3.0) == pytest.approx(0.25)
    assert priority(0.0) < scoring.UNREADABLE_PRIORITY <= 1.0
    values = [priority(s) for s in (0.0, 0.01, 0.5, 2.0, 40.0)]
    assert values == sorted(values, reverse=True) and all(0 < v < 1 for v in values)
    assert 1 / priority(2.5) - 1 == pytest.approx(2.5)
    with pytest.raises(ValueError):
        priority(-0.1)


def test_the_tie_break_and_the_cap_move_a_score_by_at_most_what_the_docs_say():
    docs = (Path(__file__).resolve().parent.parent / "docs" / "ale.md").read_text()
    assert "up to two parts in a\nmillion" in docs and "at most one part in a million" in docs
    for ale in (0.0, 1e-9, 0.3, 5.0):
        for tie in (0.0, 0.5, 0.999999):
            moved = abs(priority(ale, tie) - 1 / (1 + ale)) / (1 / (1 + ale))
            assert moved <= 2e-6
            if ale > 1e-3:
                assert moved <= 1e-6 + 1e-12  # only the tie-break
    assert abs(priority(0.0, 0.999999) - 1.0) > 1.5e-6  # the cap and the tie-break together: the bound is needed



@pytest.mark.parametrize("score, tie_break", [(float("nan"), 0.0), (-0.1, 0.0), (1.0, 1.0), (1.0, -0.01),
                                               (1.0, float("nan"))])
def test_a_score_that_is_no_number_or_a_tie_break_out_of_range_is_refused(score, tie_break):
    with pytest.raises(ValueError):
        priority(score, tie_break)


@pytest.mark.parametrize("strategy", ["entropy-sum", "ale-entropy-sum", "lc-max", "ale-lc-mean"])
def test_entropy_and_lc_cannot_rank_one_class_and_say_so(strategy):
    one_class = [np.array([[0.9], [0.2]]), np.array([[0.4]]), np.array([[0.05], [0.6], [0.3]])]
    assert all(score == 0 for score in score_images(one_class, strategy))  # nothing to rank by
    assert strategy in cannot_rank(strategy, 1) and cannot_rank(strategy, 0)
    assert cannot_rank(strategy, 2) is None


@pytest.mark.parametrize("strategy", ["ale-unknown-mean", "unknown-max", "count", "random"])
def test_unknown_count_and_random_rank_one_class(strategy):
    one_class = [np.array([[0.9], [0.2]]), np.array([[0.4]]), np.array([[0.05], [0.6], [0.3]])]
    assert len(set(score_images(one_class, strategy, np.random.default_rng(0)))) == 3
    assert cannot_rank(strategy, 1) is None
