"""Orders decided over a pool (ale_backend.orders): the discovery lane's share and class-balanced turns."""

import numpy as np
import pytest

from ale_backend.orders import (
    DISCOVERY_SHARE,
    ORDERS,
    groups_by_predicted_class,
    interleave,
    order,
    round_robin,
)
from ale_backend.scoring import score_images


def _pool(rng, images=40, classes=4):
    """As the photographs look to the base model: crowded images of known classes (3 to 5 boxes, class scores up to
    0.6), and every fifth image an unseen species (one box, every class score below 0.1)."""
    pool = []
    for i in range(images):
        if i % 5 == 0:
            pool.append(rng.uniform(0.0, 0.1, (1, classes)))
        else:
            pool.append(rng.uniform(0.05, 0.6, (int(rng.integers(3, 6)), classes)))
    return pool


def test_every_prefix_of_an_interleaved_queue_holds_the_lanes_share():
    main = np.arange(20)
    lane = np.arange(20)[::-1]
    merged = interleave(main, lane, 0.3)
    assert sorted(merged) == list(range(20))  # each index once
    from_lane = [i for i, index in enumerate(merged) if index >= 10]  # the lane ranks 19, 18, ... first
    for k in range(1, 11):
        assert sum(1 for index in merged[:k] if index >= 10) == int(np.floor(k * 0.3))
    assert from_lane[:3] == [3, 6, 9]
    # a lane that has nothing left that the main ranking has not taken: the main ranking fills the rest
    assert list(interleave(np.arange(5), np.arange(5), 0.5)) == [0, 1, 2, 3, 4]


def test_the_discovery_order_gives_the_unknown_images_their_share_of_the_queue():
    pool = _pool(np.random.default_rng(0))
    queue = order("discovery-ale-unknown-mean", pool)
    assert sorted(queue) == list(range(len(pool)))
    default = np.argsort(-score_images(pool, "ale-unknown-mean"), kind="stable")
    lane = np.argsort(-score_images(pool, "unknown-mean"), kind="stable")
    assert list(queue) == list(interleave(default, lane, DISCOVERY_SHARE))
    unknown = set(range(0, len(pool), 5))
    assert len(set(queue[:10].tolist()) & unknown) == 3 > len(set(default[:10].tolist()) & unknown)


def test_balanced_picks_take_turns_over_the_predicted_classes():
    cat, dog, bird = [0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9]
    pool = [np.array([cat, cat, dog]), np.array([cat]), np.array([cat, cat]), np.array([dog]),
            np.zeros((0, 3)), np.array([bird, dog]), np.array([dog, dog])]
    groups = groups_by_predicted_class(pool)
    # most boxes decide; a tie (bird, dog) goes to the higher summed score (equal here: the first class, dog)
    assert list(groups) == [0, 0, 0, 1, -1, 1, 1]
    scores = np.array([0.5, 0.9, 0.1, 0.2, 0.0, 0.8, 0.3])
    # turns in the order of each group's best image: cat (0.9), dog (0.8), none; best first within each
    assert list(round_robin(groups, scores)) == [1, 5, 4, 0, 6, 2, 3]
    assert sorted(order("balanced-ale-unknown-mean", pool)) == list(range(7))


@pytest.mark.parametrize("name", ORDERS)
def test_every_order_is_a_permutation_of_the_pool_and_a_bad_name_is_refused(name):
    pool = _pool(np.random.default_rng(1))
    features = np.random.default_rng(2).random((len(pool), 8))
    assert sorted(order(name, pool, features=features, batch=7)) == list(range(len(pool)))
    with pytest.raises(ValueError, match="discovery-ale-unknown-mean"):
        order("discovery-count", pool)


def test_diverse_batches_take_the_best_ranked_then_the_unlike_among_the_candidates():
    """Ranked 0..11; images 0-5, 8, 10 and 11 look alike (one cluster), 6 and 7 like each other and unlike them,
    9 like neither. In batches of 2 from the first 8 candidates not yet picked: 0 (the best ranked), then 6 (the
    farthest); the next batch starts from the candidate farthest from both, 9 (of 1-5 and 7-9)."""
    rng = np.random.default_rng(0)
    features = np.tile([1.0, 0.0, 0.0], (12, 1)) + rng.normal(0, 0.01, (12, 3))
    features[6:8] = [0.0, 1.0, 0.0] + rng.normal(0, 0.01, (2, 3))
    features[9] = [0.0, 0.0, 1.0]
    queue = order("diverse-unknown-mean", [np.array([[1 - 0.01 * (12 - i), 0.0]]) for i in range(12)],
                  features=features, batch=2)
    assert list(queue[:2]) == [0, 6]  # plain ranking: 0, 1
    assert queue[2] == 9
    assert sorted(queue) == list(range(12))
    with pytest.raises(ValueError, match="features"):
        order("diverse-unknown-mean", [np.zeros((0, 2))] * 3)
