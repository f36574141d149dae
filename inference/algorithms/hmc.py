"""Hamiltonian Monte Carlo transitions of many independent chains at once, for AIS.

The chains of every data point move together in one vectorized state: each site's value is
``(chains, points, D)`` with its event flattened, the log density is one per chain and point,
and a leapfrog step size is one per point. The integrator is Pyro's own
``pyro.ops.integrator.velocity_verlet``.

References:
    MCMC using Hamiltonian dynamics (Neal, 2011)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pyro.ops.integrator import velocity_verlet
from torch import Tensor

__all__ = ["gradients_for_z_only", "hmc_transition"]


def hmc_transition(
    z: dict[str, Tensor],
    log_density: Callable[[dict[str, Tensor]], Tensor],
    step_size: Tensor,
    leapfrog_steps: int,
) -> tuple[dict[str, Tensor], Tensor]:
    """One HMC transition of many independent chains at once, leaving ``exp(log_density)``
    invariant for each: unit-mass momenta, ``leapfrog_steps`` steps of Pyro's
    ``velocity_verlet``, and a Metropolis accept or reject per chain.

    Args:
        z: site name -> ``(C, B, D)`` states (events flattened).
        log_density: the unnormalized log density of each chain, ``(C, B)``, differentiable
            in z.
        step_size: ``(B,)`` leapfrog step size per point.
        leapfrog_steps: leapfrog steps of the trajectory.

    Returns:
        The new states and the ``(C, B)`` acceptance probabilities.
    """
    energies: list[Tensor] = []

    def potential(state: dict[str, Tensor]) -> Tensor:
        energy = -log_density(state)
        energies.append(energy.detach())
        return energy.sum()  # chains are independent: the sum's gradient is each one's

    def kinetic(r: dict[str, Tensor]) -> Tensor:
        return sum(0.5 * v.square().sum(-1) for v in r.values())

    momentum = {name: torch.randn_like(v) for name, v in z.items()}
    size = step_size.to(next(iter(z.values()))).reshape(1, -1, 1)
    z_new, r_new, _, _ = velocity_verlet(
        dict(z), dict(momentum), potential, lambda r: r, size, leapfrog_steps
    )
    # The first potential evaluation was at the start, the last at the end.
    log_accept = energies[0] + kinetic(momentum) - energies[-1] - kinetic(r_new)
    accept_prob = log_accept.clamp(max=0).exp().nan_to_num(0.0)
    accept = (torch.rand_like(accept_prob) < accept_prob).unsqueeze(-1)
    new = {name: torch.where(accept, z_new[name], v).detach() for name, v in z.items()}
    return new, accept_prob.detach()


@contextmanager
def gradients_for_z_only(*programs: Any) -> Iterator[None]:
    """Gradients on, for z, with the programs' own parameters left out of the graph."""
    params = [
        p
        for program in programs
        if isinstance(program, torch.nn.Module)
        for p in program.parameters()
    ]
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        with torch.enable_grad():
            yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
