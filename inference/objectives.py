"""Objectives: Pyro ELBOs built by name from the spec.

Each constructor returns an object ``objective`` such that ``objective(model, guide)`` is an
``nn.Module`` whose ``forward(x)`` is the loss (negative objective, summed over the batch),
as Pyro's ``ELBO.__call__`` provides.
"""

from __future__ import annotations

from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

MAX_PLATE_NESTING = 1
"""Models and guides use one plate (the data plate); particles are vectorized outside it."""


def elbo(num_particles: int = 1) -> Trace_ELBO:
    """The ELBO with Monte Carlo KL: ``E_q[log p(x, z) - log q(z|x)]`` (Trace_ELBO).

    Args:
        num_particles: samples of z per data point, vectorized over an outer plate.
    """
    _check_particles(num_particles)
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


def _check_particles(num_particles: int) -> None:
    if int(num_particles) != num_particles or num_particles < 1:
        raise ValueError(f"num_particles must be a positive integer, got {num_particles}")


OBJECTIVES = {
    "elbo": elbo,
    "analytic_kl": analytic_kl,
}
"""Spec name -> objective constructor; the constructor's signature is the spec's schema."""
