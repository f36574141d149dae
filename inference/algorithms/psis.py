"""PSIS Pareto k̂ of importance weights through ArviZ, for both its 0.x and 1.x APIs."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

KHAT_THRESHOLD = 0.7
"""Above this Pareto k̂ an importance-sampling estimate is unreliable (Vehtari et al., 2024)."""

# The smallest K for which ArviZ's tail fit has its minimum of five tail draws.
_MIN_PSIS_SAMPLES = 25
# Log weights that agree to this many ulps of their magnitude are equal: an exact guide.
FLAT_ULPS = 64


def khat_bad_fraction(khat: Tensor) -> float:
    """The share of points whose Pareto k̂ exceeds :data:`KHAT_THRESHOLD`, among the points
    that have a k̂; NaN when none has one (k̂ not computed, e.g. K < 25).

    This is the one definition of the figure that tables, JSON and reports show: a NaN k̂
    means "not computed" and is neither good nor bad.
    """
    known = ~torch.isnan(khat)
    if not known.any():
        return math.nan
    return (khat[known] > KHAT_THRESHOLD).double().mean().item()


def pareto_khat(log_weights: Tensor, flat_tol: float | None = None) -> Tensor:
    """The PSIS Pareto k̂ of importance weights, one per row, computed by ArviZ.

    Wraps ``arviz.psislw`` (ArviZ < 1, which takes log weights) and
    ``arviz_stats.base.array_stats.psislw`` (ArviZ >= 1, which takes log-likelihoods in
    the PSIS-LOO convention and negates them), so that both see the same weights.

    Args:
        log_weights: ``(..., K)`` log importance weights, unnormalized.
        flat_tol: relative spread under which a row counts as all-equal weights; default
            :data:`FLAT_ULPS` ulps of ``log_weights``' dtype (pass the tolerance of the
            dtype the weights were computed in when they were upcast).

    Returns:
        ``(...)`` float64 k̂: 0 for rows whose weights are all equal (nothing to fit), NaN
        for K < 25 or non-finite rows.

    References:
        Pareto Smoothed Importance Sampling (Vehtari et al., 2024).
    """
    if flat_tol is None:
        flat_tol = FLAT_ULPS * torch.finfo(log_weights.dtype).eps
    lw = log_weights.detach().to("cpu", torch.float64)
    return _khat_rows(lw.reshape(-1, lw.shape[-1]).numpy(), flat_tol).reshape(lw.shape[:-1])


def _khat_rows(log_weights: np.ndarray, flat_tol: float) -> Tensor:
    """k̂ per row of ``(M, K)`` float64 log weights; see :func:`pareto_khat`."""
    khat = np.full(len(log_weights), np.nan)
    if log_weights.shape[-1] < _MIN_PSIS_SAMPLES:
        return torch.from_numpy(khat)
    finite = np.isfinite(log_weights).all(-1)
    with np.errstate(invalid="ignore"):
        spread = np.ptp(log_weights, axis=-1)
        magnitude = np.maximum(1.0, np.abs(log_weights).max(-1))
        flat = finite & (spread <= flat_tol * magnitude)
    khat[flat] = 0.0
    fit = finite & ~flat
    if fit.any():
        khat[fit] = _psis_backend()(log_weights[fit])
    # ArviZ < 1 reports a tail too short to fit (ties at the top) as inf: not a bad fit.
    khat[np.isinf(khat)] = np.nan
    return torch.from_numpy(khat)


def _psis_backend() -> Callable[[np.ndarray], np.ndarray]:
    # Deferred: importing ArviZ takes a second and only k̂ needs it. ArviZ 0.x announces its
    # refactor in a multi-line FutureWarning on its first import each day, which says
    # nothing about this call; it is silenced here, for this import only.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing", category=FutureWarning)
        import arviz

    if int(arviz.__version__.split(".")[0]) < 1:
        return _khat_arviz
    return _khat_arviz_stats


def _khat_arviz(log_weights: np.ndarray) -> np.ndarray:
    """ArviZ < 1: ``psislw`` takes log importance weights."""
    import arviz

    return np.asarray(arviz.psislw(log_weights, reff=1.0)[1], dtype=np.float64)


def _khat_arviz_stats(log_weights: np.ndarray) -> np.ndarray:
    """ArviZ >= 1 (arviz-stats): ``psislw`` takes log-likelihoods and negates them."""
    from arviz_stats.base import array_stats

    def khat(rows: np.ndarray) -> np.ndarray:
        return np.asarray(array_stats.psislw(-rows, r_eff=1.0)[1], dtype=np.float64)

    try:
        return khat(log_weights)
    except ValueError:
        # arviz-stats raises on a tail of tied weights; only then go row by row.
        rows = []
        for row in log_weights:
            try:
                rows.append(khat(row))
            except ValueError:
                rows.append(np.float64(np.nan))
        return np.array(rows, dtype=np.float64)
