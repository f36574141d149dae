"""Diagnostics of a trained VAE: where the KL goes, which units are used, how q(z) fits p(z).

For a model with a latent site ``"z"`` (``model.sites.LATENT``), a prior ``model.prior()``
and a likelihood ``model.decode(z)``, and an amortized guide whose ``encoder(x)`` is q(z|x),
:func:`diagnose` computes, over N data points:

- the reconstruction term E_q[log p(x|z)] and KL(q(z|x) || p(z)) per point, the KL also per
  latent dimension when q and p both factorize into univariate distributions with an
  analytic KL (diagonal Gaussians);
- active units: dimension d is active when Var_x(E_q[z_d|x]) exceeds 0.01 (Burda et al.);
- the aggregate posterior q(z) = (1/N) sum_n q(z|x_n): its moments against the prior's, and
  the split of the average KL into mutual information and marginal KL (Hoffman and Johnson):
  ``mean_n KL(q(z|x_n) || p(z)) = I(x; z) + KL(q(z) || p(z))``;
- optionally, the importance-sampling estimate of log p(x) with its Pareto k̂
  (:func:`inference.marginal.log_marginal_likelihood`).

The aggregate terms are exact for the N-point mixture, up to the Monte Carlo error of the
outer expectation: with z drawn from q(z|x_n), ``log q(z) = logsumexp_j log q(z|x_j) - log N``
is the mixture's own log density, computed in chunks of z so memory stays bounded. As
estimates of the same quantities for the data distribution they are biased for finite N: the
mixture of N components is lumpier than the population's aggregate posterior, so the mutual
information is biased down (it is the InfoNCE bound, at most log N) and the marginal KL up by
the same amount, since their sum, the average KL, is unbiased. The bias shrinks as N grows;
with N = 500 points, an MI near log 500 ≈ 6.2 nats means the bound is saturated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from inference.marginal import KHAT_THRESHOLD, MarginalLikelihood, log_marginal_likelihood

__all__ = [
    "ACTIVITY_THRESHOLD",
    "Diagnostics",
    "diagnose",
    "khat_bad_fraction",
    "univariate_factors",
]

ACTIVITY_THRESHOLD = 0.01
"""A unit is active when the variance over x of its posterior mean exceeds this (Burda et al.)."""

_PRIOR_MOMENT_SAMPLES = 10_000
_DEFAULT_MAX_MEMORY = 64 * 2**20


@dataclass(frozen=True)
class Diagnostics:
    """Per-point and per-dimension diagnostics of a model and guide on N points.

    Every tensor is float64 on the CPU.

    Attributes:
        reconstruction: ``(N,)`` E_q[log p(x|z)], a Monte Carlo mean over the draws.
        kl: ``(N,)`` KL(q(z|x) || p(z)), analytic where torch has it, else Monte Carlo.
        kl_per_dim: ``(N, D)`` the analytic KL per latent dimension, or None where q and p
            do not both factorize into univariate distributions (then a per-dimension KL is
            not defined).
        kl_method: ``"analytic per dimension"``, ``"analytic"`` or ``"monte carlo"``.
        posterior_mean: ``(N, D)`` E_q[z|x] (the sample mean where q has no closed form).
        posterior_variance: ``(N, D)`` Var_q[z_d|x] (the sample variance likewise).
        samples: ``(S, N, D)`` draws z ~ q(z|x_n): S N draws from the aggregate posterior.
        prior_mean: ``(D,)`` the prior's mean (from samples where it has no closed form).
        prior_variance: ``(D,)`` the prior's marginal variances, likewise.
        pointwise_information: ``(N,)`` E_{q(z|x_n)}[log q(z|x_n) - log q(z)], whose mean
            is the mutual information I(x; z) under the N-point aggregate.
        mutual_information: I(x; z), at most log N (see the module docstring on bias).
        marginal_kl: KL(q(z) || p(z)), Monte Carlo over the same draws.
        marginal: the importance-sampling result for the same points, or None.
        activity_threshold: the variance of the posterior mean above which a unit is active.
        notes: plain-language remarks on how the figures were computed.

    References:
        Importance Weighted Autoencoders (Burda, Grosse and Salakhutdinov, 2016);
        ELBO surgery: yet another way to carve up the variational evidence lower bound
        (Hoffman and Johnson, 2016)
    """

    reconstruction: Tensor
    kl: Tensor
    kl_per_dim: Tensor | None
    kl_method: str
    posterior_mean: Tensor
    posterior_variance: Tensor
    samples: Tensor
    prior_mean: Tensor
    prior_variance: Tensor
    pointwise_information: Tensor
    mutual_information: float
    marginal_kl: float
    marginal: MarginalLikelihood | None = None
    activity_threshold: float = ACTIVITY_THRESHOLD
    notes: tuple[str, ...] = ()

    @property
    def elbo(self) -> Tensor:
        """``(N,)`` the ELBO per point, reconstruction minus KL."""
        return self.reconstruction - self.kl

    @property
    def activity(self) -> Tensor:
        """``(D,)`` Var_x(E_q[z_d|x]), the variance over points of each posterior mean."""
        return self.posterior_mean.var(0)

    @property
    def active(self) -> Tensor:
        """``(D,)`` bool, whether each unit is active."""
        return self.activity > self.activity_threshold

    @property
    def aggregate_mean(self) -> Tensor:
        """``(D,)`` the mean of the aggregate posterior q(z)."""
        return self.posterior_mean.mean(0)

    @property
    def aggregate_variance(self) -> Tensor:
        """``(D,)`` the variance of q(z): mean posterior variance plus variance of the means."""
        return self.posterior_variance.mean(0) + self.posterior_mean.var(0, correction=0)

    def summary(self) -> dict[str, float]:
        """Dataset-level figures as plain floats, for tables and JSON.

        ``log_px_se`` is the standard error of the mean log p(x) over the points (their
        spread), ``log_px_mc_stderr`` the importance sampler's Monte Carlo error of it.
        """
        n, d = self.posterior_mean.shape
        out = {
            "num_points": float(n),
            "latent_dim": float(d),
            "elbo": self.elbo.mean().item(),
            "reconstruction": self.reconstruction.mean().item(),
            "kl": self.kl.mean().item(),
            "mutual_information": self.mutual_information,
            "mutual_information_bound": math.log(n),
            "marginal_kl": self.marginal_kl,
            "active_units": float(self.active.sum().item()),
        }
        if self.marginal is not None:
            ml = self.marginal.summary()
            out["log_px"] = ml["log_px"]
            out["log_px_se"] = _standard_error(self.marginal.log_px)
            out["log_px_mc_stderr"] = ml["log_px_stderr"]
            out["ess"] = ml["ess"]
            out["khat_max"] = ml["khat_max"]
            out["khat_bad_fraction"] = khat_bad_fraction(self.marginal.khat)
            out["num_samples"] = float(self.marginal.num_samples)
        return out


def diagnose(
    model: Any,
    guide: Any,
    x: Tensor,
    *,
    num_samples: int = 500,
    num_latent_samples: int = 16,
    marginal: MarginalLikelihood | None = None,
    activity_threshold: float = ACTIVITY_THRESHOLD,
    batch_size: int = 256,
    max_memory: int = _DEFAULT_MAX_MEMORY,
) -> Diagnostics:
    """Diagnoses a model and amortized guide on the data points ``x``.

    Args:
        model: a VAE: ``model.prior()`` is p(z) and ``model.decode(z)`` is p(x|z).
        guide: an amortized guide: ``guide.encoder(x)`` is q(z|x) with batch shape ``(N,)``.
        x: ``(N, F)`` data points; N > 1.
        num_samples: K, importance samples per point for log p(x) and k̂; 0 skips it.
        num_latent_samples: S, draws of z per point for the reconstruction term, the
            Monte Carlo KL, the aggregate posterior and non-Gaussian moments.
        marginal: an importance-sampling result for the same ``x`` to reuse, instead of
            running the estimator.
        activity_threshold: the variance of the posterior mean above which a unit is active.
        batch_size: points decoded at a time (times S draws).
        max_memory: approximate budget in bytes of the ``(z, point)`` log-density matrix
            of one chunk of the aggregate posterior.

    Returns:
        The :class:`Diagnostics`.

    Raises:
        ValueError: fewer than two points, or a non-positive S or batch size.

    References:
        ELBO surgery: yet another way to carve up the variational evidence lower bound
        (Hoffman and Johnson, 2016)

    Example:
        >>> d = diagnose(run.model, run.guide, data.test[:500], num_samples=500)
        >>> d.summary()["active_units"], d.summary()["mutual_information"]
    """
    if x.dim() != 2 or len(x) < 2:
        raise ValueError(f"x must be (N, F) with N >= 2, got shape {tuple(x.shape)}")
    for name, value in (("num_latent_samples", num_latent_samples), ("batch_size", batch_size)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if marginal is None and num_samples > 0:
        marginal = log_marginal_likelihood(model, guide, x, num_samples=num_samples)
    if marginal is not None and len(marginal.log_px) != len(x):
        raise ValueError(f"marginal has {len(marginal.log_px)} points but x has {len(x)}")

    notes: list[str] = []
    with torch.no_grad(), pyro.validation_enabled(False):
        q = guide.encoder(x)
        p = model.prior()
        z = q(torch.Size((num_latent_samples,)))
        log_q = q.log_prob(z)
        log_p = p.log_prob(z)
        reconstruction = torch.cat(
            [
                model.decode(z[:, block]).log_prob(x[block]).mean(0)
                for block in torch.arange(len(x)).split(batch_size)
            ]
        )
        kl, kl_per_dim, kl_method = _kl(q, p, (log_q - log_p).mean(0))
        if kl_method == "monte carlo":
            notes.append(
                f"KL(q(z|x) || p(z)) is a Monte Carlo mean over {num_latent_samples} draws: "
                "torch has no closed form for this guide and prior, and since they do not "
                "both factorize over dimensions there is no per-dimension KL."
            )
        elif kl_method == "analytic":
            notes.append(
                "KL(q(z|x) || p(z)) is analytic but q and p do not both factorize over "
                "dimensions, so there is no per-dimension KL."
            )
        mean, variance = _moments(q)
        if mean is None:
            notes.append(
                f"q(z|x) has no closed-form moments; posterior means and variances are "
                f"sample moments of {num_latent_samples} draws."
            )
            mean, variance = z.mean(0), z.var(0)
        prior_mean, prior_variance = _moments(p)
        if prior_mean is None:
            draws = p(torch.Size((_PRIOR_MOMENT_SAMPLES,)))
            prior_mean, prior_variance = draws.mean(0), draws.var(0)
            notes.append(f"prior moments are sample moments of {_PRIOR_MOMENT_SAMPLES} draws.")
        log_qz = _aggregate_log_prob(q, z, max_memory)

    def cpu(t: Tensor) -> Tensor:
        return t.detach().to("cpu", torch.float64)

    latent_dim = z.shape[-1]
    pointwise = cpu(log_q - log_qz).mean(0)
    return Diagnostics(
        reconstruction=cpu(reconstruction),
        kl=cpu(kl),
        kl_per_dim=None if kl_per_dim is None else cpu(kl_per_dim),
        kl_method=kl_method,
        posterior_mean=cpu(mean),
        posterior_variance=cpu(variance),
        samples=cpu(z),
        prior_mean=cpu(prior_mean).expand(latent_dim),
        prior_variance=cpu(prior_variance).expand(latent_dim),
        pointwise_information=pointwise,
        mutual_information=pointwise.mean().item(),
        marginal_kl=cpu(log_qz - log_p).mean().item(),
        marginal=marginal,
        activity_threshold=activity_threshold,
        notes=tuple(notes),
    )


def khat_bad_fraction(khat: Tensor) -> float:
    """The share of points whose Pareto k̂ exceeds 0.7, among those with a k̂ (NaN if none)."""
    known = ~torch.isnan(khat)
    if not known.any():
        return math.nan
    return (khat[known] > KHAT_THRESHOLD).double().mean().item()


def _standard_error(values: Tensor) -> float:
    return (values.std() / math.sqrt(len(values))).item() if len(values) > 1 else math.nan


def univariate_factors(d: Distribution) -> Distribution | None:
    """The univariate base of a distribution independent over its last dim, else None.

    ``Normal(loc, scale).to_event(1)`` gives ``Normal(loc, scale)``, whose batch shape ends
    in the latent dimension; a multivariate or flow distribution gives None.
    """
    base = getattr(d, "base_dist", None)
    if getattr(d, "reinterpreted_batch_ndims", None) == 1 and base is not None:
        return base if base.event_shape == () else None
    return None


def _kl(q: Distribution, p: Distribution, monte_carlo: Tensor) -> tuple[Tensor, Tensor | None, str]:
    """KL(q || p) per point, per dimension where defined, and how it was computed."""
    q_base, p_base = univariate_factors(q), univariate_factors(p)
    if q_base is not None and p_base is not None:
        try:
            per_dim = kl_divergence(q_base, p_base)
            return per_dim.sum(-1), per_dim, "analytic per dimension"
        except NotImplementedError:
            pass
    try:
        return kl_divergence(q, p), None, "analytic"
    except NotImplementedError:
        return monte_carlo, None, "monte carlo"


def _moments(d: Distribution) -> tuple[Tensor | None, Tensor | None]:
    """Closed-form mean and variance, or (None, None) where the distribution has none."""
    try:
        return d.mean, d.variance
    except (NotImplementedError, AttributeError):
        return None, None


def _aggregate_log_prob(q: Distribution, z: Tensor, max_memory: int) -> Tensor:
    """log q(z) = logsumexp_j log q(z|x_j) - log N for draws ``z`` of shape ``(S, N, D)``."""
    num_points, latent_dim = z.shape[1], z.shape[2]
    flat = z.reshape(-1, latent_dim)
    # Each z of a chunk is scored against all N components: (chunk, N, D) elementwise terms.
    chunk = max(1, max_memory // (num_points * latent_dim * flat.element_size() * 4))
    log_qz = [
        torch.logsumexp(q.log_prob(part.unsqueeze(1)), dim=-1) - math.log(num_points)
        for part in flat.split(chunk)
    ]
    return torch.cat(log_qz).reshape(z.shape[:2])
