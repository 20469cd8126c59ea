"""Orders decided over a whole pool: the sequence of images an annotator walks, when it is more than a sort.

A strategy of :mod:`ale_backend.scoring` scores each image alone and the queue is those scores sorted. Two answers
from the literature to what such a queue does with a weak detector (it returns the top of one score, which on
photographs is crowded images of known classes; docs/does-ale-help.md) need the pool at once:

* ``discovery-<strategy>``: a fixed share of the queue (:data:`DISCOVERY_SHARE`) is a *discovery lane*, the pool
  ranked by ``unknown-mean`` (the mean of ``1 - max raw class score`` without sqrt(N): images whose boxes no known
  class explains, which is how an unseen species looks to the model), the rest ``<strategy>``'s ranking. The lanes
  are interleaved so that every prefix of the queue holds the share: position ``i`` belongs to the discovery lane
  when ``floor((i + 1) * share) > floor(i * share)``; an image already taken by one lane is skipped by the other.
* ``diverse-<strategy>``: two stages (PPAL, Yang et al. CVPR 2024, without its box-level distance): the
  :data:`CANDIDATES` times a batch's images that ``<strategy>`` ranks first, then among them the batch picked by
  k-center greedy on what the images look like to the model (the pooled backbone output of the same forward pass,
  :attr:`ale_backend.detector.Detections.features`; cosine distance): the top-ranked candidate first (or the one
  farthest from the earlier batches), then each time the candidate farthest from every image picked so far. Batch
  after batch until the pool is ordered.
* ``balanced-<strategy>``: class-balanced picks (Emam et al. 2021, "Active Learning at the ImageNet Scale"): each
  image belongs to its predicted class (the class of most of its boxes, ties to the higher summed score; images
  without boxes to a group of their own), and the queue takes the best remaining image of each group in turn, by
  ``<strategy>``'s score; groups take their turns in the order of their best image.

:func:`order` gives the queue as pool indices.

These orders are screened on the benchmark (``python -m benchmarks.active_learning --strategies
discovery-ale-unknown-mean ...``); the backend's queue does not serve them yet (``ALE_STRATEGY`` refuses them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ale_backend.scoring import STRATEGIES, score_images

DISCOVERY_SHARE = 0.3
"""Share of the queue given to the discovery lane (the literature's suggestion: 25 to 30 %)."""
DISCOVERY_LANE = "unknown-mean"
"""The strategy that ranks the discovery lane."""
CANDIDATES = 4
"""Candidates per image of a batch in the first stage of ``diverse-`` (PPAL's choice)."""
SET_ORDERS = ("discovery", "diverse", "balanced")
"""Prefixes of the orders decided over a pool."""
_BASES = tuple(s for s in STRATEGIES if s not in {"random", "count"} and not s.startswith("power-"))
ORDERS: tuple[str, ...] = tuple(f"{kind}-{base}" for kind in SET_ORDERS for base in ("ale-unknown-mean",
                                                                                      "unknown-mean")
                                 if f"{kind}-{base}" != f"discovery-{DISCOVERY_LANE}")
"""The set orders the benchmark screens: each kind over the default strategy and over ``unknown-mean`` (but a
discovery lane beside its own ranking, which is that ranking)."""


def order(name: str, class_scores: Sequence[np.ndarray], rng: np.random.Generator | None = None,
          features: np.ndarray | None = None, batch: int = 10) -> np.ndarray:
    """The queue of the order ``name`` (one of :data:`ORDERS`, or any strategy of :mod:`ale_backend.scoring`, then
    its scores sorted, ties in pool order) over a pool of images given by their detections' raw class scores
    (``(N_i, C)`` each); pool indices, first served first. ``diverse-`` orders need the images' ``features``
    (``(n, F)``) and the ``batch`` they pick at a time."""
    kind, _, base = name.partition("-")
    if kind not in SET_ORDERS:
        return np.argsort(-score_images(class_scores, name, rng), kind="stable")
    if base not in _BASES:
        raise ValueError(f"unknown order {name!r}: {kind}- goes before a strategy of the unknown, entropy or lc "
                         f"measures, e.g. {kind}-ale-unknown-mean")
    scores = score_images(class_scores, base, rng)
    if kind == "discovery":
        lane = np.argsort(-score_images(class_scores, DISCOVERY_LANE, rng), kind="stable")
        return interleave(np.argsort(-scores, kind="stable"), lane, DISCOVERY_SHARE)
    if kind == "diverse":
        if features is None or len(features) != len(class_scores):
            raise ValueError(f"{name} needs every image's features")
        return diverse_batches(np.argsort(-scores, kind="stable"), np.asarray(features, dtype=np.float64), batch)
    return round_robin(groups_by_predicted_class(class_scores), scores)


def interleave(main: np.ndarray, lane: np.ndarray, share: float) -> np.ndarray:
    """``main`` and ``lane`` (two rankings of the same indices) merged so that every prefix of the result takes
    ``share`` of its positions from ``lane`` (position i when ``floor((i + 1) * share) > floor(i * share)``), each
    index once; when one ranking has nothing left, the other fills the rest."""
    rankings = [np.asarray(main, dtype=np.int64), np.asarray(lane, dtype=np.int64)]
    taken = np.zeros(len(rankings[0]), dtype=bool)
    next_of = [0, 0]
    out = []
    for i in range(len(rankings[0])):
        lane_turn = int(np.floor((i + 1) * share) > np.floor(i * share))
        for which in (lane_turn, 1 - lane_turn):
            ranking = rankings[which]
            while next_of[which] < len(ranking) and taken[ranking[next_of[which]]]:
                next_of[which] += 1
            if next_of[which] < len(ranking):
                pick = int(ranking[next_of[which]])
                break
        taken[pick] = True
        out.append(pick)
    return np.array(out, dtype=np.int64)


def diverse_batches(ranked: np.ndarray, features: np.ndarray, batch: int, candidates: int = CANDIDATES) -> np.ndarray:
    """The pool in batches of ``batch``: each the k-center greedy picks (cosine distance between ``features``) among
    the first ``candidates * batch`` images of ``ranked`` not yet picked, starting from the top-ranked one when
    nothing was picked before, else from the one farthest from everything picked."""
    batch = max(1, int(batch))
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    unit = np.divide(features, norms, out=np.zeros_like(features), where=norms > 0)
    left = [int(i) for i in ranked]
    nearest = np.full(len(ranked), np.inf)  # distance of each image to the nearest one picked
    out: list[int] = []
    while left:
        pool = np.array(left[: candidates * batch])
        for _ in range(min(batch, len(pool))):
            distance = nearest[pool]
            pick = int(pool[0]) if not out else int(pool[int(np.argmax(distance))])  # ties: the better ranked
            out.append(pick)
            nearest = np.minimum(nearest, 1.0 - unit @ unit[pick])
            pool = pool[pool != pick]
        chosen = set(out)
        left = [i for i in left if i not in chosen]
    return np.array(out, dtype=np.int64)


def groups_by_predicted_class(class_scores: Sequence[np.ndarray]) -> np.ndarray:
    """Each image's predicted class: the class of most of its boxes (the highest raw score of each box), ties to the
    class with the higher summed score; -1 for an image without boxes."""
    groups = np.full(len(class_scores), -1, dtype=np.int64)
    for i, scores in enumerate(class_scores):
        if not len(scores):
            continue
        scores = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1)
        votes = np.bincount(scores.argmax(axis=1), minlength=scores.shape[1])
        tied = np.flatnonzero(votes == votes.max())
        groups[i] = int(tied[np.argmax(scores[:, tied].sum(axis=0))])
    return groups


def round_robin(groups: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Images taken in turns from each group, the best remaining (highest score, ties in pool order) each time;
    groups take their turns in the order of their best image."""
    queues = {}
    for index in np.argsort(-scores, kind="stable"):
        queues.setdefault(int(groups[index]), []).append(int(index))
    turns = list(queues.values())  # in the order of each group's best image
    out: list[int] = []
    depth = 0
    while len(out) < len(scores):
        out += [queue[depth] for queue in turns if depth < len(queue)]
        depth += 1
    return np.array(out, dtype=np.int64)
