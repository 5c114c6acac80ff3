"""PED (potential energy decline) feature dynamics, LogME-PED, and the score registry.

Li et al., "Exploring Model Transferability through the Lens of Potential Energy"
(ICCV 2023): before scoring, move the features as early fine-tuning would, by pushing
overlapping classes apart. The procedure follows ASVP.md ("Alignment score"):

1. standardise with a reference set (its mean, and its std floored at 1e-3);
2. per class c: mean mu_c and radius R_c = sqrt(sum of per-dimension variances);
3. for each class pair: overlap = max(nsigma (R_i + R_j) - ||mu_i - mu_j||, 0),
   step = min(0.5 dt^2 constant overlap, overlap); each class moves by ``step`` directly
   away from the other;
4. every sample shifts by its class's summed move; repeat up to ``max_steps``. A step's
   movement is the L1 norm of the C x D matrix of per-class moves (each class counted once,
   whatever its size); the first step's movement is the reference, and a later step whose
   movement is at most ``exit_ratio`` times it is computed but discarded (not applied), and
   ends the loop -- the stopping rule of the authors' released code;
5. un-standardise.

Kept from this project on top of the released code: labels need not be 0..C-1 (any integer
ids), and two classes whose means coincide have no direction to repel in, so they do not move
apart (instead of dividing by zero); neither case is silently skipped otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from asvp_ray.alignment.logme import _check_features, _check_labels, logme
from asvp_ray.core.checks import is_int, is_number
from asvp_ray.core.errors import BadInputError, ConfigError
from asvp_ray.core.registry import Registry

__all__ = [
    "ALIGNMENT_SCORES",
    "PedResult",
    "alignment_scores",
    "logme_ped",
    "ped_move",
    "ped_trace",
]

_STD_FLOOR = 1e-3


@dataclass(frozen=True)
class PedResult:
    """Moved features and how far each PED step moved them.

    Attributes:
        features: N x D moved features, in the input's (un-standardised) space, float64.
        movements: one entry per step applied: the L1 norm of the C x D per-class moves in
            standardised space (each class counted once).
        discarded: the movement of the step that triggered the exit rule (computed, at most
            ``exit_ratio`` times the first step's, and not applied), or None when the loop
            ended at ``max_steps`` or because the first step moved nothing.
    """

    features: np.ndarray
    movements: Tuple[float, ...]
    discarded: Optional[float] = None

    @property
    def steps(self) -> int:
        """Number of steps applied."""
        return len(self.movements)


def _check_ped_params(dt: float, nsigma: float, constant: float, exit_ratio: float, max_steps: int) -> None:
    for name, value in (("dt", dt), ("nsigma", nsigma), ("constant", constant), ("exit_ratio", exit_ratio)):
        if not is_number(value, minimum=0):
            raise ConfigError(f"PED {name} must be a finite number >= 0, got {value!r}")
    if not is_int(max_steps):
        raise ConfigError(f"PED max_steps must be an int >= 1, got {max_steps!r}")


def _class_moves(mu: np.ndarray, radius: np.ndarray, coef: float, nsigma: float) -> np.ndarray:
    """Summed move of every class for one step (C x D), vectorised over class pairs.

    Args:
        mu: C x D class means (standardised space).
        radius: C class radii.
        coef: ``0.5 * dt^2 * constant``.
        nsigma: overlap multiplier k.
    """
    diff = mu[:, None, :] - mu[None, :, :]  # C x C x D, row i points from j to i
    dist = np.sqrt((diff * diff).sum(axis=2))
    overlap = np.maximum(nsigma * (radius[:, None] + radius[None, :]) - dist, 0.0)
    step = np.minimum(coef * overlap, overlap)
    # Coincident means (dist = 0, including i = j) have no direction to move apart in.
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(dist > 0, step / dist, 0.0)
    return np.einsum("ij,ijd->id", scale, diff)


# Rows of the reference converted to float64 at a time (reference_moments).
_MOMENT_ROWS = 1024


def reference_moments(reference: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray]:
    """The per-dimension mean and (population) standard deviation of a reference matrix, in
    float64, computed ``_MOMENT_ROWS`` rows at a time in two passes: the same values as
    ``ref.mean(0)`` and ``ref.std(0)`` of the whole matrix in float64, without that copy (the
    driver's alignment monitor standardises with 20,000 pool rows by default: 205 MB as float64
    at 1,280 dimensions, twice over for ``std``).

    Raises:
        BadInputError: not 2-D, fewer than 2 rows, another width than ``width``, or NaN/inf
            entries (naming the first).
    """
    ref = np.asarray(reference)
    if ref.ndim != 2:
        raise BadInputError(f"reference: expected a 2-D array (samples x dimensions), got shape {ref.shape}")
    n = ref.shape[0]
    if n < 2:
        raise BadInputError(f"reference: need at least 2 samples, got {n}")
    if ref.shape[1] != width:
        raise BadInputError(f"reference: width {ref.shape[1]} does not match features' {width} dimensions")
    total = np.zeros(width)
    for s in range(0, n, _MOMENT_ROWS):
        c = np.asarray(ref[s:s + _MOMENT_ROWS], dtype=np.float64)
        bad = ~np.isfinite(c)
        if bad.any():
            first = np.argwhere(bad)[0]
            raise BadInputError(f"reference: NaN/inf value(s), first at row {s + first[0]}, column {first[1]}; "
                                "drop or repair those samples before scoring")
        total += c.sum(axis=0)
    mean = total / n
    sq = np.zeros(width)
    for s in range(0, n, _MOMENT_ROWS):
        c = np.asarray(ref[s:s + _MOMENT_ROWS], dtype=np.float64) - mean
        sq += np.einsum("ij,ij->j", c, c)
    return mean, np.sqrt(sq / n)


def ped_trace(
    features: np.ndarray,
    labels: np.ndarray,
    reference: Optional[np.ndarray] = None,
    dt: float = 0.1,
    nsigma: float = 0.6,
    constant: float = 1.0,
    exit_ratio: float = 0.5,
    max_steps: int = 6,
) -> PedResult:
    """Run PED and return the moved features together with each step's movement.

    Args: see :func:`ped_move`.

    Returns:
        A :class:`PedResult`.

    Raises:
        BadInputError: invalid features, labels or reference (shape, NaN/inf, width).
        ConfigError: a negative or non-finite parameter, or max_steps < 1.
    """
    _check_ped_params(dt, nsigma, constant, exit_ratio, max_steps)
    f = _check_features(features)
    n, d = f.shape
    y = _check_labels(labels, n, None)
    if reference is None:
        mean, std = f.mean(axis=0), f.std(axis=0)
    else:
        mean, std = reference_moments(reference, d)
    std = np.maximum(std, _STD_FLOOR)
    z = (f - mean) / std

    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    c = classes.size
    sums = np.zeros((c, d))
    np.add.at(sums, inverse, z)
    mu = sums / counts[:, None]
    centred = z - mu[inverse]
    sq = np.zeros(c)
    np.add.at(sq, inverse, (centred * centred).sum(axis=1))
    radius = np.sqrt(sq / counts)  # sqrt of the sum of per-dimension (population) variances

    coef = 0.5 * dt * dt * constant
    total_move = np.zeros((c, d))
    movements = []
    discarded = None
    for _ in range(max_steps):
        move = _class_moves(mu, radius, coef, nsigma)
        moved = float(np.abs(move).sum())  # L1 of the per-class moves, each class once
        if movements and moved <= exit_ratio * movements[0]:
            discarded = moved  # the released code's exit: this step is not applied
            break
        mu = mu + move  # a translation: radii stay the same
        total_move += move
        movements.append(moved)
        if moved == 0.0:
            break  # nothing overlaps: every later step would move nothing too
    out = f + total_move[inverse] * std
    return PedResult(features=out, movements=tuple(movements), discarded=discarded)


def ped_move(
    features: np.ndarray,
    labels: np.ndarray,
    reference: Optional[np.ndarray] = None,
    dt: float = 0.1,
    nsigma: float = 0.6,
    constant: float = 1.0,
    exit_ratio: float = 0.5,
    max_steps: int = 6,
) -> np.ndarray:
    """Move features as PED's simulated early fine-tuning does.

    Args:
        features: N samples x D dimensions, finite.
        labels: N integer class ids >= 0.
        reference: M x D features whose mean and std standardise the space (the project
            passes the pool's features); default: ``features`` themselves.
        dt: time step.
        nsigma: k, how many radii two classes may overlap before they repel.
        constant: a, the force constant.
        exit_ratio: a step whose movement (L1 of the per-class moves) is at most this
            fraction of the first step's is discarded and ends the loop.
        max_steps: at most this many steps.

    Returns:
        N x D float64 moved features in the input's space. Identical to the input (up to
        float64 conversion) when no pair of classes overlaps.

    Raises:
        BadInputError: invalid features, labels or reference.
        ConfigError: invalid parameters.
    """
    return ped_trace(features, labels, reference, dt, nsigma, constant, exit_ratio, max_steps).features


def logme_ped(
    features: np.ndarray,
    labels: np.ndarray,
    reference: Optional[np.ndarray] = None,
    *,
    num_classes: Optional[int] = None,
    **ped_kwargs: float,
) -> float:
    """LogME of the PED-moved features ("LogME-PED").

    Args:
        features: N samples x D dimensions.
        labels: N integer class ids.
        reference: standardisation reference for PED (default: ``features``).
        num_classes: passed to :func:`logme` as a range check.
        **ped_kwargs: ``dt``, ``nsigma``, ``constant``, ``exit_ratio``, ``max_steps``.

    Returns:
        The LogME score of the moved features.

    Raises:
        BadInputError: invalid inputs.
        ConfigError: invalid or unknown PED parameters.
    """
    allowed = {"dt", "nsigma", "constant", "exit_ratio", "max_steps"}
    unknown = sorted(set(ped_kwargs) - allowed)
    if unknown:
        raise ConfigError(
            f"logme_ped: unknown PED parameter(s) {', '.join(unknown)}; "
            f"valid: {', '.join(sorted(allowed))}"
        )
    moved = ped_move(features, labels, reference, **ped_kwargs)
    return logme(moved, labels, num_classes)


ScoreFn = Callable[..., float]

ALIGNMENT_SCORES: Registry[ScoreFn] = Registry("alignment score")
"""Alignment scores: ``fn(features, labels, reference=None) -> float``, higher = better."""


@ALIGNMENT_SCORES.register("logme")
def _score_logme(features: np.ndarray, labels: np.ndarray, reference: Optional[np.ndarray] = None) -> float:
    # LogME needs no reference; the argument keeps one signature for every score.
    return logme(features, labels)


@ALIGNMENT_SCORES.register("logme_ped")
def _score_logme_ped(features: np.ndarray, labels: np.ndarray, reference: Optional[np.ndarray] = None) -> float:
    return logme_ped(features, labels, reference)


def alignment_scores(
    features: np.ndarray,
    labels: np.ndarray,
    reference: Optional[np.ndarray] = None,
    scores: Sequence[str] = ("logme", "logme_ped"),
) -> Dict[str, float]:
    """Compute several alignment scores of features on labels.

    Args:
        features: N samples x D dimensions (typically the labelled set's current features).
        labels: N integer class ids.
        reference: standardisation reference for PED-based scores (the pool's features).
        scores: names registered in :data:`ALIGNMENT_SCORES`.

    Returns:
        ``{name: score}`` in the order asked.

    Raises:
        ConfigError: an unknown score name (the message lists the valid ones).
        BadInputError: invalid inputs.
    """
    if isinstance(scores, str):
        raise ConfigError(f"scores must be a sequence of names, e.g. ({scores!r},), not a string")
    fns = {name: ALIGNMENT_SCORES.get(name) for name in scores}  # fail before computing
    return {name: float(fn(features, labels, reference)) for name, fn in fns.items()}
