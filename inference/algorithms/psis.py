"""PSIS Pareto k̂ of importance weights: a batched generalized-Pareto fit in torch, with
ArviZ (both its 0.x and 1.x APIs) as the reference it is tested against."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torch import Tensor

KHAT_THRESHOLD = 0.7
"""Above this Pareto k̂ an importance-sampling estimate is unreliable (Vehtari et al., 2024)."""

# The smallest K for which the tail fit has its minimum of five tail draws.
_MIN_PSIS_SAMPLES = 25
# Log weights that agree to this many ulps of their magnitude are equal: an exact guide.
FLAT_ULPS = 64
# Zhang and Stephens' (2009) empirical-Bayes fit, with the constants ArviZ and loo use: the
# prior on b (its scale in units of the first quartile), and the weakly informative prior on
# k (Vehtari et al., 2024, eq. 10), worth ``_PRIOR_K`` draws at k = 0.5.
_PRIOR_B = 3
_PRIOR_K = 10


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


def pareto_khat(
    log_weights: Tensor,
    flat_tol: float | None = None,
    *,
    backend: Literal["torch", "arviz"] = "torch",
) -> Tensor:
    """The PSIS Pareto k̂ of importance weights, one per row.

    The default backend fits every row at once in float64 on the weights' device, with the
    algorithm of ArviZ's ``psislw`` (the tail of the M = ceil(min(K / 5, 3 sqrt(K))) largest
    weights, Zhang and Stephens' empirical-Bayes generalized-Pareto fit, the prior on k);
    it agrees with ArviZ to 1e-6 (tested). ``backend="arviz"`` calls ArviZ row by row on the
    CPU: ``arviz.psislw`` (ArviZ < 1, which takes log weights) or
    ``arviz_stats.base.array_stats.psislw`` (ArviZ >= 1, which takes log-likelihoods in the
    PSIS-LOO convention and negates them), so that both see the same weights.

    Args:
        log_weights: ``(..., K)`` log importance weights, unnormalized.
        flat_tol: relative spread under which a row counts as all-equal weights; default
            :data:`FLAT_ULPS` ulps of ``log_weights``' dtype (pass the tolerance of the
            dtype the weights were computed in when they were upcast).
        backend: ``"torch"`` (batched, on the weights' device) or ``"arviz"`` (the reference).

    Returns:
        ``(...)`` float64 k̂ on the weights' device (on the CPU for ``"arviz"``): 0 for rows
        whose weights are all equal (nothing to fit), NaN for K < 25, non-finite rows and
        tails too short to fit (ties at the top).

    References:
        Pareto Smoothed Importance Sampling (Vehtari et al., 2024); A new and efficient
        estimation method for the generalized Pareto distribution (Zhang and Stephens, 2009).

    Example:
        >>> import torch
        >>> heavy = torch.distributions.Pareto(1.0, 0.8).sample((2, 1000)).log()
        >>> bool((pareto_khat(heavy) > KHAT_THRESHOLD).all())
        True
    """
    if backend not in ("torch", "arviz"):
        raise ValueError(f"backend must be 'torch' or 'arviz', got {backend!r}")
    if flat_tol is None:
        flat_tol = FLAT_ULPS * torch.finfo(log_weights.dtype).eps
    lw = log_weights.detach().to(torch.float64)
    if backend == "arviz":
        lw = lw.cpu()
    rows = lw.reshape(-1, lw.shape[-1])
    khat = torch.full(rows.shape[:-1], math.nan, dtype=torch.float64, device=rows.device)
    if rows.shape[-1] < _MIN_PSIS_SAMPLES or len(rows) == 0:
        return khat.reshape(lw.shape[:-1])
    finite = torch.isfinite(rows).all(-1)
    safe = torch.where(finite[:, None], rows, 0.0)
    spread = safe.amax(-1) - safe.amin(-1)
    magnitude = safe.abs().amax(-1).clamp(min=1.0)
    flat = finite & (spread <= flat_tol * magnitude)
    khat = torch.where(flat, 0.0, khat)
    fit = finite & ~flat
    if backend == "arviz":
        fit_rows = fit.numpy()
        if fit_rows.any():
            khat[fit] = torch.from_numpy(_psis_backend()(rows[fit].numpy()))
    else:
        khat = torch.where(fit, _khat_batched(safe), khat)
    # A tail too short to fit (ties at the top) is reported as inf by ArviZ < 1: not a bad fit.
    khat = torch.where(torch.isinf(khat), math.nan, khat)
    return khat.reshape(lw.shape[:-1])


def _khat_batched(log_weights: Tensor) -> Tensor:
    """k̂ of every row of ``(R, K)`` finite float64 log weights, as ``arviz.psislw`` fits it;
    inf where the tail has at most four draws."""
    num_samples = log_weights.shape[-1]
    tail_size = math.ceil(min(num_samples / 5.0, 3 * math.sqrt(num_samples)))
    x = log_weights - log_weights.amax(-1, keepdim=True)
    # The tail_size + 1 largest, ascending: the first is the cutoff, the tail lies above it.
    top = x.topk(tail_size + 1, dim=-1).values.flip(-1)
    cutoff = top[:, :1].clamp(min=math.log(torch.finfo(torch.float64).tiny))
    above = top[:, 1:] > cutoff
    # Ties at the cutoff shorten a row's tail; the tail is always the last ``n`` entries.
    tail_len = above.sum(-1)
    tail = (top[:, 1:].exp() - cutoff.exp()).where(above, 0.0)
    khat = torch.full_like(cutoff[:, 0], math.inf)
    lengths = tail_len.unique().tolist()  # one host sync; rows nearly always share one length
    for n in lengths:
        if n <= 4:
            continue
        rows = tail_len == n
        fitted = _gpd_shape(tail[:, tail_size - n :], n)
        khat = torch.where(rows, fitted, khat)
    return khat


def _gpd_shape(tail: Tensor, n: int) -> Tensor:
    """Zhang and Stephens' estimate of the generalized-Pareto shape of each row of ``(R, n)``
    ascending positive exceedances, with the prior on k of Vehtari et al. (ArviZ's ``_gpdfit``)."""
    m = 30 + int(n**0.5)
    j = torch.arange(1, m + 1, dtype=tail.dtype, device=tail.device)
    quartile = tail[:, int(n / 4 + 0.5) - 1 : int(n / 4 + 0.5)]
    b = (1 - (m / (j - 0.5)).sqrt()) / (_PRIOR_B * quartile) + 1 / tail[:, -1:]  # (R, m)
    k = torch.log1p(-b[:, :, None] * tail[:, None, :]).mean(-1)  # (R, m)
    profile = n * ((-(b / k)).log() - k - 1)
    weights = 1 / (profile[:, None, :] - profile[:, :, None]).exp().sum(-1)
    keep = weights >= 10 * torch.finfo(torch.float64).eps  # negligible weights dropped, NaN too
    weights = weights.where(keep, 0.0)
    total = weights.sum(-1, keepdim=True)
    # With every weight dropped ArviZ's posterior mean of b is an empty sum: 0.
    b_post = (b.where(keep, 0.0) * weights).sum(-1, keepdim=True) / total.where(total > 0, 1.0)
    k_post = torch.log1p(-b_post * tail).mean(-1)
    return (n * k_post + _PRIOR_K * 0.5) / (n + _PRIOR_K)


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
