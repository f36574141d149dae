"""Bidirectional Monte Carlo: log p(x) sandwiched between forward and reverse AIS on data
simulated from the model.

References:
    Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse, Ghahramani
    and Adams, 2015)
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import torch
from torch import Tensor

from pyrovae.inference.algorithms.annealing import (
    INITIAL_STEP_SIZE,
    AnnealedLikelihood,
    Program,
    anneal,
    annealed_log_marginal_likelihood,
    annealing_schedule,
    check_annealing,
    latent_values,
    log_mean_exp,
    prior_trace,
)
from pyrovae.inference.algorithms.scoring import MAX_PLATE_NESTING

__all__ = ["BDMC", "bdmc"]


@dataclass(frozen=True)
class BDMC:
    """A bidirectional Monte Carlo sandwich on simulated data; float64 tensors on the CPU.

    Attributes:
        x: ``(N, *features)`` the data simulated from the model.
        lower: ``(N,)`` forward AIS estimates, lower bounds of log p(x) in expectation.
        upper: ``(N,)`` reverse AIS estimates, upper bounds of log p(x) in expectation.
        forward: the forward run.
        reverse: the reverse run (its ``log_px`` is ``upper``).
    """

    x: Tensor
    lower: Tensor
    upper: Tensor
    forward: AnnealedLikelihood
    reverse: AnnealedLikelihood

    @property
    def gap(self) -> float:
        """The mean of upper minus lower: how far the forward estimate may be off."""
        return (self.upper - self.lower).mean().item()

    def summary(self) -> dict[str, float]:
        return {
            "lower": self.lower.mean().item(),
            "upper": self.upper.mean().item(),
            "gap": self.gap,
            "acceptance": self.forward.acceptance.mean().item(),
        }


def bdmc(
    model: Program,
    guide: Program,
    num_points: int = 100,
    *,
    example: Tensor,
    num_chains: int = 4,
    num_steps: int = 500,
    schedule: str = "sigmoid",
    leapfrog_steps: int = 10,
    step_size: float | None = None,
    target_accept: float = 0.65,
    batch_size: int = 128,
    max_plate_nesting: int = MAX_PLATE_NESTING,
    progress: bool = False,
) -> BDMC:
    """Sandwiches log p(x) on ``num_points`` points simulated from the model.

    Draws (z, x) from the model (its data unobserved), then runs forward AIS from the guide
    on x (a lower bound of log p(x) in expectation) and reverse AIS from z, an exact sample
    of p(z|x) (an upper bound in expectation: the reverse weights estimate 1 / p(x) without
    bias). The gap between them shrinks as ``num_steps`` grows and tells how many steps the
    model needs before the forward estimate on real data can be trusted.

    Args:
        model: a Pyro model ``model(x)``.
        guide: its guide.
        num_points: how many points to simulate.
        example: a data tensor ``(n, *features)`` giving the shape, dtype and device of x.
        num_chains: as in :func:`annealed_log_marginal_likelihood`, and so are
            ``num_steps``, ``schedule``, ``leapfrog_steps``, ``step_size``,
            ``target_accept``, ``batch_size``, ``max_plate_nesting`` and ``progress``; the
            same for both directions.

    Returns:
        The :class:`BDMC` result.

    References:
        Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse,
        Ghahramani and Adams, 2015)
    """
    check_annealing(
        example, num_chains, num_steps, leapfrog_steps, target_accept, "guide", batch_size
    )
    template = example[:1].expand(num_points, *example.shape[1:]).contiguous()
    with torch.no_grad(), pyro.validation_enabled(False):
        trace, observed = prior_trace(model, template)
    if len(observed) != 1:
        raise ValueError(f"bdmc needs a model with one observed site, got {observed}")
    x = trace.nodes[observed[0]]["value"].detach()
    latents = latent_values(trace, observed)
    betas = annealing_schedule(schedule, num_steps)
    settings = (leapfrog_steps, step_size or INITIAL_STEP_SIZE, target_accept)
    forward = annealed_log_marginal_likelihood(
        model,
        guide,
        x,
        num_chains,
        num_steps,
        schedule=schedule,
        leapfrog_steps=leapfrog_steps,
        step_size=step_size,
        target_accept=target_accept,
        batch_size=batch_size,
        max_plate_nesting=max_plate_nesting,
        progress=progress,
    )
    reverse_blocks = []
    for start in range(0, num_points, batch_size):
        rows = slice(start, start + batch_size)
        z = {
            name: v[rows].expand(num_chains, *v[rows].shape).clone() for name, v in latents.items()
        }
        reverse_blocks.append(
            anneal(
                model,
                guide,
                x[rows],
                z,
                betas.flip(0),
                *settings,
                "guide",
                max_plate_nesting,
                progress,
            )
        )
    # The reverse weights estimate 1 / p(x): their log-mean-exp, negated, bounds from above.
    log_weights = torch.cat([b[0] for b in reverse_blocks], 1).T.contiguous()
    upper, stderr = log_mean_exp(log_weights, negated=True)
    reverse = AnnealedLikelihood(
        log_px=upper,
        stderr=stderr,
        log_weights=log_weights,
        acceptance=torch.cat([b[1] for b in reverse_blocks]),
        step_size=torch.cat([b[2] for b in reverse_blocks]),
        num_chains=num_chains,
        num_steps=num_steps,
        evaluations=forward.evaluations,
    )
    return BDMC(x.cpu().double(), forward.log_px, upper, forward, reverse)
