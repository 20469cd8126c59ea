"""Image scores for active learning: aggregated uncertainty and the ALE extension.

An image's detections each carry a class-score vector. A strategy turns the ``(N, C)`` matrix of one image into one
number; the higher the number, the sooner the image should be labelled.

* ``<measure>-<reduction>``: ``A(S)``, the per-detection uncertainty ``S`` aggregated over the image by ``sum``,
  ``mean`` or ``max`` (eq. 3-5). ``S`` is the paper's ``entropy`` or ``lc`` (least confidence) of the normalised
  class scores, or ``unknown``, ``1 - max`` of the raw class scores (see :mod:`ale_backend.uncertainty`).
* ``ale-<measure>-<reduction>``: ``A(S) * sqrt(N)`` (eq. 6), N = number of detections. The paper's "ALE Entr Sum"
  is ``ale-entropy-sum``; this project's default is ``ale-unknown-mean`` (:data:`DEFAULT_STRATEGY`).
* ``count``: N itself, the control for "crowded images win".
* ``random``: a uniform random number, independent of the detections.
* ``power-<strategy>``: power sampling (Kirsch et al., "Stochastic Batch Acquisition", TMLR 2023) over the unknown
  measure's strategies: the queue is a draw without replacement with probability proportional to the strategy's
  score, instead of strictly its top (which, batch after batch, returns near-duplicates of one failure mode). Drawn
  per image, so it fits a queue scored one task at a time: the score times ``exp(G)``, G a standard Gumbel draw
  seeded by the task (the Gumbel-top-k trick: sorting ``log s + G`` is such a draw).

Every strategy but ``random`` scores an image without detections 0.

Label Studio wants a prediction score in [0, 1] and its "Uncertainty sampling" serves the *lowest* score first, so
:func:`priority` maps an image score to ``1 / (1 + score)``: the highest-ALE task has the lowest priority score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ale_backend.uncertainty import MEASURES, PAPER_MEASURES

REDUCTIONS: dict[str, Callable[[np.ndarray], float]] = {
    "sum": np.sum,
    "mean": np.mean,
    "max": np.max,
}
"""Aggregation name -> function over an image's per-detection uncertainties (eq. 3-5)."""



def _uncertainty_strategies(measures) -> tuple[str, ...]:
    plain = tuple(f"{m}-{r}" for m in measures for r in REDUCTIONS)
    return (*plain, *(f"ale-{name}" for name in plain))


PAPER_STRATEGIES: tuple[str, ...] = ("random", "count", *_uncertainty_strategies(PAPER_MEASURES))
"""The 14 strategies of the ALE paper's comparison (``count`` is the control for "crowded images win")."""
POWER = "power-"
"""Prefix of the power-sampling strategies."""
POWER_STRATEGIES: tuple[str, ...] = tuple(f"{POWER}{name}" for name in _uncertainty_strategies(["unknown"]))
"""Power sampling over the ``unknown`` measure, with and without sqrt(N)."""
STRATEGIES: tuple[str, ...] = (
    *PAPER_STRATEGIES,
    *_uncertainty_strategies(m for m in MEASURES if m not in PAPER_MEASURES),
    *POWER_STRATEGIES,
)
"""Every strategy name, in a stable order: the paper's first."""

DEFAULT_STRATEGY = "ale-unknown-mean"
"""ALE over the ``unknown`` measure: ``mean(1 - max raw class score) * sqrt(N)``. Chosen by the benchmark on
development seeds kept apart from the evaluation seeds (``docs/benchmark``): its selections hold 2 to 3 times as many
new-class objects as random ones and teach the new classes about twice as fast, where ``ale-entropy-sum`` (the
paper's best) teaches them no faster than random order."""

def cannot_rank(strategy: str, project_classes: int) -> str | None:
    """Why ``strategy`` gives every image the same score in a project where ``project_classes`` of the model's classes
    have a project label, or None when it can rank it.

    Certainty is measured over the project's classes only
    (:meth:`~ale_backend.label_config.LabelMap.project_class_scores`): with one such class the normalised class
    vector of every box is ``[1]``, whose entropy and least confidence are 0, so the paper's ``entropy`` and ``lc``
    strategies, with or without sqrt(N), score every image 0 (the queue is then only the tie-break's random order).
    ``unknown`` reads the raw scores and still ranks.
    """
    parsed = Strategy.parse(strategy)
    if parsed.measure in PAPER_MEASURES and project_classes <= 1:
        return (f"strategy {strategy} cannot rank this project: {project_classes} of the model's classes "
                f"{'has' if project_classes == 1 else 'have'} a project label, and {parsed.measure} over one class "
                f"is 0 for every box, so every task scores 0 (random order); choose an unknown- strategy (the "
                f"default {DEFAULT_STRATEGY}) until the model knows two of the project's classes")
    return None


READABLE_PRIORITY_CEILING = 1.0 - 1e-6
"""Largest priority score a readable image gets; 1.0 itself is kept for tasks whose image could not be read."""
UNREADABLE_PRIORITY = 1.0
"""Priority score of a task whose image could not be read: after every readable task in the queue."""


@dataclass(frozen=True)
class Strategy:
    """A parsed strategy name."""

    name: str
    measure: str | None = None
    reduction: str | None = None
    ale: bool = False
    power: bool = False
    """Drawn in proportion to the score rather than ranked by it."""

    @classmethod
    def parse(cls, name: str) -> Strategy:
        if name not in STRATEGIES:
            raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
        if name in {"random", "count"}:
            return cls(name)
        power = name.startswith(POWER)
        plain = name.removeprefix(POWER)
        ale = plain.startswith("ale-")
        measure, reduction = plain.removeprefix("ale-").split("-")
        return cls(name, measure, reduction, ale, power)


def aggregated_uncertainty(class_scores: np.ndarray, measure: str, reduction: str) -> float:
    """``A(S)``: the image's per-detection uncertainties reduced to one number (0 without detections).

    Parameters
    ----------
    class_scores : array of shape (N, C)
        Raw class scores of the image's N detections (each measure normalises them where it needs to).
    measure : a key of :data:`ale_backend.uncertainty.MEASURES`
    reduction : ``"sum"``, ``"mean"`` or ``"max"``
    """
    scores = _as_matrix(class_scores)
    if scores.shape[0] == 0:
        return 0.0
    uncertainties = MEASURES[measure](scores)
    return float(REDUCTIONS[reduction](uncertainties))


def score_image(
    class_scores: np.ndarray, strategy: str = DEFAULT_STRATEGY, rng: np.random.Generator | None = None
) -> float:
    """Score one image by ``strategy``; higher means label it sooner.

    Parameters
    ----------
    class_scores : array of shape (N, C)
        One row of raw class scores per detection on the image; N may be 0.
    strategy : str
        One of :data:`STRATEGIES`.
    rng : numpy Generator, optional
        Source of the ``random`` strategy's number and of the ``power-`` strategies' draw (a fresh unseeded one when
        omitted).

    Returns
    -------
    float
        ``A(S) * sqrt(N)`` for ``ale-`` strategies, ``A(S)`` for plain ones, ``N`` for ``count``, a number in
        [0, 1) for ``random``, the score times ``exp(G)`` (G standard Gumbel) for ``power-``; 0 for an image
        without detections (except ``random``).
    """
    parsed = Strategy.parse(strategy)
    scores = _as_matrix(class_scores)
    n = scores.shape[0]
    if parsed.name == "random":
        return float((rng or np.random.default_rng()).random())
    if parsed.name == "count":
        return float(n)
    value = aggregated_uncertainty(scores, parsed.measure, parsed.reduction)
    value = value * float(np.sqrt(n)) if parsed.ale else value
    return value * power_draw(rng or np.random.default_rng()) if parsed.power else value


def power_draw(rng: np.random.Generator) -> float:
    """``exp(G)``, G a standard Gumbel draw: images ranked by ``score * exp(G)`` come in the order of a draw without
    replacement with probabilities proportional to their scores (the Gumbel-top-k trick; ``power-`` strategies)."""
    u = min(max(float(rng.random()), 1e-300), 1.0 - 1e-16)
    return float(1.0 / -np.log(u))  # exp(G) for G = -log(-log(u))


def score_images(
    images: Sequence[np.ndarray], strategy: str = DEFAULT_STRATEGY, rng: np.random.Generator | None = None
) -> np.ndarray:
    """:func:`score_image` over several images' class-score matrices; returns an array of shape (len(images),)."""
    rng = rng or np.random.default_rng()
    return np.array([score_image(scores, strategy, rng) for scores in images], dtype=np.float64)


TIE_BREAK_SPAN = 1e-6
"""Relative size of the tie-break: equal image scores (e.g. the zeros of a cold-start model that detects nothing)
are ordered by a seeded random number instead of Label Studio's fixed order, without reordering distinct scores
by more than this."""


def priority(score: float, tie_break: float = 0.0) -> float:
    """Map an image score (>= 0) to Label Studio's prediction score: ``1 / (1 + score)``, capped just below 1.

    Decreasing in the score, so Label Studio's "Uncertainty sampling" (lowest first) and an ascending sort on the
    prediction score serve the highest-scoring image first. Invert with ``score = 1 / priority - 1`` (exact to
    ``TIE_BREAK_SPAN``). ``tie_break`` in [0, 1) lowers the result by up to ``TIE_BREAK_SPAN`` relative.
    """
    if not score >= 0:
        raise ValueError(f"image scores are non-negative, got {score!r}")
    if not 0.0 <= tie_break < 1.0:
        raise ValueError(f"tie_break must be in [0, 1), got {tie_break!r}")
    return min(1.0 / (1.0 + score), READABLE_PRIORITY_CEILING) * (1.0 - TIE_BREAK_SPAN * tie_break)


def _as_matrix(class_scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(class_scores, dtype=np.float64)
    if scores.ndim == 1 and scores.size == 0:
        return scores.reshape(0, 1)
    if scores.ndim != 2:
        raise ValueError(f"class scores must be a 2-D (detections, classes) array, got shape {scores.shape}")
    return scores
