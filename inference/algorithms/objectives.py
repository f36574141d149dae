"""Objectives: variational bounds built by name from the spec.

Each constructor returns an object ``objective`` such that ``objective(model, guide)`` is an
``nn.Module`` whose ``forward(x)`` is the loss (negative bound, summed over the batch), as
Pyro's ``ELBO.__call__`` provides. The loss's value is the bound's Monte Carlo estimate; its
gradient is the chosen estimator's, which may differ from the value's own gradient (Pyro's
surrogate-loss convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.elbo import ELBOModule
from pyro.poutine.trace_struct import Trace
from torch import Tensor, nn

from pyrovae.inference.algorithms.scoring import MAX_PLATE_NESTING, Scores, score
from pyrovae.inference.errors import check_int

ESTIMATORS = ("reparam", "stl", "dreg")
"""Gradient estimators of :class:`ParticleBound`: reparameterization, sticking-the-landing,
doubly reparameterized."""


def elbo(num_particles: int = 1, estimator: str = "reparam") -> Trace_ELBO | ParticleBound:
    """The ELBO with Monte Carlo KL: ``E_q[log p(x, z) - log q(z|x)]``.

    Args:
        num_particles: samples of z per data point, vectorized over an outer plate.
        estimator: ``"reparam"``, the reparameterization gradient (Pyro's Trace_ELBO), or
            ``"stl"``, sticking the landing: the same value, but the guide's log density
            enters the gradient only through z, which removes the score term (zero mean)
            and so the variance that remains when q is close to the posterior.

    References:
        Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference (Roeder et al., 2017)
    """
    _check_particles(num_particles)
    _check_estimator(estimator, ("reparam", "stl"))
    if estimator == "stl":
        return ParticleBound(num_particles, importance_weighted=False, estimator=estimator)
    return Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


def analytic_kl(num_particles: int = 1) -> TraceMeanField_ELBO:
    """The ELBO with the KL term in closed form where Pyro has it (TraceMeanField_ELBO).

    Lower variance than :func:`elbo` for Gaussian priors and guides; falls back to Monte
    Carlo for pairs without a registered KL.

    Args:
        num_particles: samples of z per data point, vectorized over an outer plate.
    """
    _check_particles(num_particles)
    return TraceMeanField_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


def iwae(num_particles: int = 10, estimator: str = "reparam") -> ParticleBound:
    """The importance-weighted bound ``E[log (1/k) sum_i p(x, z_i) / q(z_i|x)]`` per point.

    Tighter than the ELBO as ``k = num_particles`` grows, and equal to it for ``k = 1``.

    Args:
        num_particles: importance samples k per data point, vectorized over a plate.
        estimator: ``"reparam"`` (the IWAE gradient); ``"dreg"``, doubly reparameterized:
            unbiased, and its guide gradient does not lose signal as k grows; or ``"stl"``,
            sticking the landing, lower variance but biased for ``k > 1``.

    References:
        Importance Weighted Autoencoders (Burda et al., 2016)
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives
        (Tucker et al., 2018)
    """
    _check_particles(num_particles)
    _check_estimator(estimator, ESTIMATORS)
    return ParticleBound(num_particles, importance_weighted=True, estimator=estimator)


class ParticleBound:
    """A bound from the log weights ``log p(x, z) - log q(z|x)`` of k particles per point.

    The guide and the model replayed against it are traced once under a plate of
    ``num_particles`` (dimension -2, outside the data plate), giving log weights of shape
    ``(k, B)``. The bound per point is their mean over particles (the ELBO) or, with
    ``importance_weighted``, their log-mean-exp (the IWAE bound); the loss is minus its sum
    over points. Every sample site must lie in the data plate and the guide must be
    reparameterized.

    ``"stl"`` and ``"dreg"`` give the guide's log density gradient only through z: it is
    scored a second time at ``z.detach()``, whose gradient (the score term) is subtracted.
    With several latent sites, the score term of a site also drops the dependence of its
    parameters on earlier sites. ``"dreg"`` then weights each particle's gradient into z by
    its normalized weight once more.

    Args:
        num_particles: particles k per data point.
        importance_weighted: log-mean-exp over particles rather than the mean.
        estimator: one of :data:`ESTIMATORS`; ``"dreg"`` needs ``importance_weighted``.

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> loss_fn = ParticleBound(5, importance_weighted=True, estimator="dreg")(vae, guide)
        >>> loss = loss_fn(torch.randn(4, 5))
        >>> loss.backward()
        >>> all(p.grad is not None for p in guide.parameters())
        True

    References:
        Importance Weighted Autoencoders (Burda et al., 2016)
        Sticking the Landing: Simple, Lower-Variance Gradient Estimators for Variational
        Inference (Roeder et al., 2017)
        Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives
        (Tucker et al., 2018)
    """

    def __init__(
        self, num_particles: int = 1, importance_weighted: bool = False, estimator: str = "reparam"
    ) -> None:
        _check_particles(num_particles)
        _check_estimator(estimator, ESTIMATORS)
        if estimator == "dreg" and not importance_weighted:
            raise ValueError(
                "estimator 'dreg' is for the importance-weighted bound; use 'stl' for the ELBO"
            )
        self.num_particles = int(num_particles)
        self.importance_weighted = importance_weighted
        self.estimator = estimator

    def __call__(self, model: nn.Module, guide: nn.Module) -> ELBOModule:
        """The loss module: ``forward(*args)`` is :meth:`differentiable_loss`."""
        return ELBOModule(model, guide, self)

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Tensor:
        """Minus the bound summed over points, with the estimator's gradient."""
        scores = self.score(model, guide, *args, **kwargs)
        log_w = scores.log_weight
        if not self.importance_weighted:
            return -log_w.mean(0).sum()
        if self.estimator == "dreg" and log_w.requires_grad:
            _weight_path_gradients(scores.guide_trace, torch.softmax(log_w.detach(), dim=0))
        return -(torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)).sum()

    def score(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Scores:
        """The pair's :class:`~pyrovae.inference.algorithms.scoring.Scores` under this bound's
        particles and estimator: ``scores.log_weight`` is ``(k, B)``."""
        return score(
            model,
            guide,
            *args,
            num_particles=self.num_particles,
            path_only=self.estimator != "reparam",
            **kwargs,
        )


def _weight_path_gradients(guide_trace: Trace, weights: Tensor) -> None:
    """Multiplies the gradient reaching each guide sample by its particle's weight."""
    for site in guide_trace.nodes.values():
        if site["type"] != "sample":
            continue
        value = site["value"]
        if value.requires_grad:
            w = weights.reshape(weights.shape + (1,) * (value.dim() - weights.dim()))
            value.register_hook(lambda grad, w=w: grad * w)


def _check_particles(num_particles: int) -> None:
    check_int(num_particles, "num_particles")


def _check_estimator(estimator: str, valid: tuple[str, ...]) -> None:
    if estimator not in valid:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {', '.join(valid)}")


def enumerated_elbo(num_particles: int = 1) -> TraceEnum_ELBO:
    """The ELBO with discrete guide sites marked ``infer={"enumerate": "parallel"}`` summed
    out exactly (Pyro's TraceEnum_ELBO): the semi-supervised model's unlabelled y.

    Args:
        num_particles: samples of the continuous latents per data point.
    """
    _check_particles(num_particles)
    return TraceEnum_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


OBJECTIVES = {
    "elbo": elbo,
    "enumerated_elbo": enumerated_elbo,
    "analytic_kl": analytic_kl,
    "iwae": iwae,
}
"""Spec name -> objective constructor; the constructor's signature is the spec's schema."""
