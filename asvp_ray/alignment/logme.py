"""LogME: log marginal evidence of a Bayesian linear model on fixed features.

You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning"
(ICML 2021), in the fixed-point form of their JMLR follow-up. For features F (N x D) and
one-vs-rest 0/1 targets y_c, the score is the per-sample log evidence of
``y_c = F w + noise`` with prior ``w ~ N(0, I / alpha)`` and noise ``N(0, 1 / beta)``,
at the (alpha, beta) found by the fixed-point iteration, averaged over the classes present.

Two deliberate points (see ASVP.md, "Alignment score"):

* The null directions of F count. ``sum log(alpha + beta * sigma)`` runs over all D
  dimensions with ``sigma = 0`` beyond the rank k, so the alpha terms reduce to
  ``k/2 log alpha - 1/2 sum_k log(alpha + beta sigma_i)``. The score is therefore unchanged
  when zero columns are appended, also when N < D (ASVP's early rounds). The authors' code
  sums only the k nonzero terms and shifts with zero-padding.
* ``m2`` and ``res2`` in the evidence are evaluated at the final (alpha, beta), so the score
  is exactly the log evidence at the returned hyperparameters (equal to the matrix formula
  with ``A = alpha I + beta F^T F``). The authors' code reuses the previous iteration's
  values; the two differ only to second order at the 1e-3 stopping tolerance.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from asvp_ray.core.checks import is_int
from asvp_ray.core.errors import BadInputError

__all__ = ["logme", "spectrum"]

_MAX_ITERS = 11
_STOP_RTOL = 1e-3
_EPS = 1e-5  # the authors' regulariser in the alpha/beta updates
_METHODS = ("auto", "svd", "gram")


def _check_features(features: np.ndarray, name: str = "features") -> np.ndarray:
    """Validate a feature matrix and return it as float64.

    Raises:
        BadInputError: not 2-D, fewer than 2 rows, no columns, or NaN/inf entries.
    """
    try:
        f = np.asarray(features, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise BadInputError(f"{name}: cannot convert to a float64 array ({e})") from None
    if f.ndim != 2:
        raise BadInputError(
            f"{name}: expected a 2-D array (samples x dimensions), got shape {f.shape}"
        )
    n, d = f.shape
    if n < 2:
        raise BadInputError(f"{name}: need at least 2 samples, got {n}")
    if d < 1:
        raise BadInputError(f"{name}: need at least 1 dimension, got shape {f.shape}")
    if not np.isfinite(f).all():
        bad = np.argwhere(~np.isfinite(f))[0]
        count = int((~np.isfinite(f)).sum())
        raise BadInputError(
            f"{name}: {count} NaN/inf value(s), first at row {bad[0]}, column {bad[1]}; "
            "drop or repair those samples before scoring"
        )
    return f


def _check_labels(labels: np.ndarray, n: int, num_classes: Optional[int]) -> np.ndarray:
    """Validate class labels and return them as int64.

    Raises:
        BadInputError: wrong shape or length, non-integer values, or out of range.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise BadInputError(f"labels: expected a 1-D array of class ids, got shape {y.shape}")
    if y.shape[0] != n:
        raise BadInputError(
            f"labels: length {y.shape[0]} does not match features' {n} samples (rows)"
        )
    if y.dtype == bool or not (
        np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
    ):
        raise BadInputError(f"labels: expected integer class ids, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating):
        if not np.isfinite(y).all() or not np.all(y == np.round(y)):
            raise BadInputError("labels: float labels must be whole numbers (class ids)")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise BadInputError(f"labels: class ids must be >= 0, found {int(y.min())}")
    if num_classes is not None:
        if not is_int(num_classes):
            raise BadInputError(f"num_classes must be a positive int, got {num_classes!r}")
        if (y >= num_classes).any():
            raise BadInputError(
                f"labels: class id {int(y.max())} is out of range for num_classes={num_classes}"
            )
    return y


def spectrum(features: np.ndarray, method: str = "auto") -> Tuple[np.ndarray, np.ndarray]:
    """Nonzero squared singular values of F and the matching left singular vectors.

    Args:
        features: float64 array, N samples x D dimensions (already validated).
        method: ``"svd"`` (thin SVD of F), ``"gram"`` (eigh of the smaller of F^T F and
            F F^T, several times cheaper when N and D differ a lot) or ``"auto"``.

    Returns:
        ``(sigma, u)``: sigma has k entries (the squared singular values above the rank
        tolerance, descending); u is N x k with orthonormal columns.
    """
    n, d = features.shape
    if method == "auto":
        # The Gram route costs one GEMM plus a small eigh; a thin SVD costs several passes
        # over F. Near-square F gains little, and the SVD is the more accurate route.
        method = "gram" if max(n, d) >= 2 * min(n, d) else "svd"
    if method == "svd":
        u, s, _ = np.linalg.svd(features, full_matrices=False)
        sigma = s * s
    elif method == "gram":
        if n >= d:
            evals, v = np.linalg.eigh(features.T @ features)
            evals, v = evals[::-1], v[:, ::-1]
            u = features @ v  # columns have norm sqrt(eval); normalised below
        else:
            evals, u = np.linalg.eigh(features @ features.T)
            evals, u = evals[::-1], u[:, ::-1]
        sigma = np.clip(evals, 0.0, None)
    else:
        raise BadInputError(f"method must be one of {', '.join(_METHODS)}; got {method!r}")
    if sigma.size == 0 or sigma[0] <= 0.0:
        return np.zeros(0), np.zeros((n, 0))
    # One tolerance on sigma = s^2 for both routes: eigenvalues of the Gram matrix are
    # only accurate to ~eps * sigma_max. A direction below it adds O(sigma / t) to the
    # score, so treating it as null changes the result negligibly.
    keep = sigma > sigma[0] * max(n, d) * np.finfo(np.float64).eps
    sigma, u = sigma[keep], u[:, keep]
    if method == "gram" and n >= d:
        u = u / np.sqrt(sigma)
    return sigma, u


def _fixed_point(
    sigma: np.ndarray, x: np.ndarray, r0: np.ndarray, n: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Run the alpha/beta fixed-point iteration for all classes at once.

    Each class stops independently, exactly as the per-class loop would: after at most
    11 updates or when ``|alpha/beta - t| / t <= 1e-3``.

    Args:
        sigma: k squared singular values.
        x: k x C projections ``U^T y_c``.
        r0: C residuals ``||y_c||^2 - ||x_c||^2`` outside the column space.
        n: number of samples.

    Returns:
        ``(alpha, beta)``, each of C entries.
    """
    c = x.shape[1]
    alpha = np.ones(c)
    beta = np.ones(c)
    active = np.ones(c, dtype=bool)
    s = sigma[:, None]
    x2 = x * x
    for _ in range(_MAX_ITERS):
        idx = np.flatnonzero(active)
        if idx.size == 0:
            break
        t = alpha[idx] / beta[idx]
        gamma, m2, res2 = _moments(s, x2[:, idx], r0[idx], t)
        a_new = gamma / (m2 + _EPS)
        b_new = (n - gamma) / (res2 + _EPS)
        alpha[idx], beta[idx] = a_new, b_new
        with np.errstate(divide="ignore", invalid="ignore"):
            done = np.abs(a_new / b_new - t) / t <= _STOP_RTOL
        # t = 0 happens only with gamma = 0 (no signal); further updates cannot change it.
        done |= ~(a_new > 0)
        active[idx[done]] = False
    return alpha, beta


def _moments(
    s: np.ndarray, x2: np.ndarray, r0: np.ndarray, t: np.ndarray
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """gamma, m2 and res2 of ASVP.md at ``t = alpha / beta`` (k x C arrays in, C out)."""
    denom = s + t
    gamma = (s / denom).sum(axis=0)
    m2 = (s * x2 / (denom * denom)).sum(axis=0)
    # x^2 / (1 + sigma/t)^2 written as x^2 t^2 / (sigma + t)^2 to stay finite at t -> 0
    res2 = (x2 * (t / denom) ** 2).sum(axis=0) + r0
    return gamma, m2, res2


def logme(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: Optional[int] = None,
    *,
    method: str = "auto",
) -> float:
    """LogME of features for classification labels (higher = better fit).

    One decomposition of F is shared by all classes; each class then costs O(k) per
    iteration, k = rank of F. Everything runs in float64.

    Args:
        features: N samples x D dimensions, any real dtype; N >= 2, finite.
        labels: N integer class ids >= 0. One-vs-rest 0/1 targets are built for each
            class present; absent classes do not enter the mean.
        num_classes: if given, every label must be below it (a consistency check).
        method: how F is decomposed: ``"auto"`` (default), ``"svd"`` or ``"gram"``;
            see :func:`spectrum`. The results agree to rounding.

    Returns:
        Mean over present classes of the per-sample log evidence.

    Raises:
        BadInputError: features not 2-D, fewer than 2 samples, NaN/inf, labels of the
            wrong length or type, labels out of range, or an unknown method.
    """
    f = _check_features(features)
    n, d = f.shape
    y = _check_labels(labels, n, num_classes)
    classes = np.unique(y)
    targets = (y[:, None] == classes[None, :]).astype(np.float64)  # N x C one-vs-rest

    sigma, u = spectrum(f, method)
    x = u.T @ targets  # k x C
    r0 = np.clip((targets * targets).sum(axis=0) - (x * x).sum(axis=0), 0.0, None)

    alpha, beta = _fixed_point(sigma, x, r0, n)
    t = alpha / beta
    gamma, m2, res2 = _moments(sigma[:, None], x * x, r0, t)
    # k/2 log(alpha) + (D-k)/2 log(alpha) - 1/2 [sum_k log(alpha + beta sigma)
    # + (D-k) log(alpha)] = -1/2 sum_k log1p(sigma / t): D drops out, as it should.
    with np.errstate(divide="ignore"):
        logdet_term = -0.5 * np.log1p(sigma[:, None] / t).sum(axis=0)
    evidence = (
        0.5 * n * np.log(beta)
        + logdet_term
        - 0.5 * beta * res2
        - 0.5 * alpha * m2
        - 0.5 * n * np.log(2.0 * np.pi)
    ) / n
    # When k = 0 (all-zero features) alpha does not enter: logdet_term and alpha*m2 are 0.
    return float(np.mean(evidence))
