"""Annealed importance sampling (AIS) of log p(x) per data point, and the BDMC sandwich.

For each data point, chains start from the guide q(z|x) (or the prior) and move through the
distributions ``f_b(z) = q(z|x)^(1-b) p(x, z)^b`` (or ``p(z) p(x|z)^b``) as b rises from 0
to 1 along a schedule, with Hamiltonian Monte Carlo transitions (Pyro's
``pyro.ops.integrator.velocity_verlet``) leaving each ``f_b`` invariant. The log weight of a
chain adds ``(b_t - b_{t-1}) * [log p(x, z) - log q(z|x)]`` at the state before each
transition; its exponential is an unbiased estimate of p(x), so the log-mean-exp over chains
is a stochastic lower bound that tightens as the number of steps grows (Neal, 2001). Every
log density comes from the one scoring path (:func:`~pyrovae.inference.algorithms.scoring.score`)
with the guide conditioned on the chain's state, so any model/guide pair whose latents are
continuous and sit in the data plate works, stacked latent layers included.

Bidirectional Monte Carlo (:func:`pyrovae.inference.algorithms.bdmc.bdmc`) runs the same chains on data simulated from the
model, forward from the guide (a lower bound in expectation) and in reverse from the
simulated latents, an exact posterior sample (an upper bound in expectation): the gap between
the two bounds the error of the forward estimate on data like the model's own.

References:
    Annealed Importance Sampling (Neal, 2001);
    Sandwiching the marginal likelihood using bidirectional Monte Carlo (Grosse, Ghahramani
    and Adams, 2015);
    On the Quantitative Analysis of Decoder-Based Generative Models (Wu, Burda,
    Salakhutdinov and Grosse, 2017)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from tqdm.auto import tqdm

from pyrovae.inference.algorithms.hmc import gradients_for_z_only, hmc_transition
from pyrovae.inference.algorithms.marginal import standard_error
from pyrovae.inference.algorithms.scoring import (
    MAX_PLATE_NESTING,
    PARTICLE_PLATE,
    check_sites,
    score,
)
from pyrovae.inference.errors import check_int
from pyrovae.model.labelled import Labelled

__all__ = [
    "SCHEDULES",
    "AnnealedLikelihood",
    "annealed_log_marginal_likelihood",
    "annealing_schedule",
]

Program = Callable[..., Any]
Terms = tuple[Tensor, Tensor, Tensor]
"""``(log q(z|x), log p(z), log p(x|z))`` per chain and point, ``(C, B)``."""

INITIAL_STEP_SIZE = 0.1
_ADAPT_RATE = 0.5
"""Each transition multiplies a point's step size by exp(rate * (acceptance - target))."""


def sigmoid_schedule(num_steps: int, sharpness: float = 4.0) -> Tensor:
    """``num_steps + 1`` inverse temperatures from 0 to 1, spaced by a rescaled sigmoid: dense
    at both ends, where the intermediate distributions change fastest (Grosse et al., 2015)."""
    t = torch.linspace(-sharpness, sharpness, num_steps + 1, dtype=torch.float64)
    s = torch.sigmoid(t)
    return (s - s[0]) / (s[-1] - s[0])


def linear_schedule(num_steps: int) -> Tensor:
    """``num_steps + 1`` equally spaced inverse temperatures from 0 to 1."""
    return torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)


SCHEDULES: dict[str, Callable[[int], Tensor]] = {
    "sigmoid": sigmoid_schedule,
    "linear": linear_schedule,
}
"""Schedule name -> function of the number of steps giving the inverse temperatures."""


def annealing_schedule(name: str, num_steps: int) -> Tensor:
    """The inverse temperatures of :data:`SCHEDULES` ``name`` for ``num_steps`` transitions."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    return SCHEDULES[name](num_steps)


@dataclass(frozen=True)
class AnnealedLikelihood:
    """Per-point AIS estimates; every tensor is float64 on the CPU.

    Attributes:
        log_px: ``(N,)`` log-mean-exp over chains of the log weights: a stochastic lower
            bound of log p(x) that tightens with the number of steps.
        stderr: ``(N,)`` Monte Carlo standard error of ``log_px`` over the chains (delta
            method; NaN for one chain).
        log_weights: ``(N, C)`` the chains' log weights.
        acceptance: ``(N,)`` mean HMC acceptance probability over chains and steps.
        step_size: ``(N,)`` the leapfrog step size each point ended with.
        num_chains: C.
        num_steps: T, transitions per chain.
        evaluations: evaluations of model and guide per chain and point (one for each
            weight update, ``leapfrog_steps + 1`` with gradients for each transition).
    """

    log_px: Tensor
    stderr: Tensor
    log_weights: Tensor
    acceptance: Tensor
    step_size: Tensor
    num_chains: int
    num_steps: int
    evaluations: int

    def summary(self) -> dict[str, float]:
        """Means over points; ``log_px_mc_error`` is the Monte Carlo error of the mean,
        ``log_px_se`` the standard error over the points (their spread)."""
        n = len(self.log_px)
        return {
            "log_px": self.log_px.mean().item(),
            "log_px_mc_error": self.stderr.square().sum().sqrt().item() / n,
            "log_px_se": standard_error(self.log_px),
            "acceptance": self.acceptance.mean().item(),
            "acceptance_min": self.acceptance.min().item(),
        }


def annealed_log_marginal_likelihood(
    model: Program,
    guide: Program,
    x: Tensor,
    num_chains: int = 16,
    num_steps: int = 500,
    *,
    schedule: str = "sigmoid",
    leapfrog_steps: int = 10,
    step_size: float | None = None,
    target_accept: float = 0.65,
    init: str = "guide",
    batch_size: int = 128,
    max_plate_nesting: int = MAX_PLATE_NESTING,
    progress: bool = False,
) -> AnnealedLikelihood:
    """Estimates log p(x) for every row of ``x`` by annealed importance sampling with HMC.

    Points are processed in blocks of ``batch_size``, all chains of a block vectorized in one
    particle plate; log weights are accumulated in float64. The leapfrog step size is one per
    point, adapted after every transition towards ``target_accept`` from the acceptance of
    that point's chains. Modules keep their parameters' ``requires_grad`` (gradients are
    taken with respect to z only) and their train/eval mode.

    Args:
        model: a Pyro model ``model(x)``; every sample site in the data plate, latents
            continuous.
        guide: a Pyro guide ``guide(x)`` with a site for each latent site of the model.
        x: data ``(N, *features)``.
        num_chains: C, chains per point.
        num_steps: T, annealing steps (one HMC transition each).
        schedule: ``"sigmoid"`` or ``"linear"`` spacing of the inverse temperatures.
        leapfrog_steps: leapfrog steps per HMC transition.
        step_size: the initial step size (default 0.1), adapted per point.
        target_accept: the acceptance probability the step sizes are adapted towards.
        init: ``"guide"`` (start from q(z|x)) or ``"prior"`` (start from p(z)).
        batch_size: points per block.
        max_plate_nesting: plates the programs nest; chains go in the next dimension.
        progress: show a progress bar over the annealing steps.

    Returns:
        The :class:`AnnealedLikelihood`.

    Raises:
        ValueError: bad settings, or a pair whose sites cannot be scored per point.

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> ais = annealed_log_marginal_likelihood(vae, guide, torch.randn(3, 5), 4, num_steps=10)
        >>> ais.log_px.shape, ais.log_weights.shape  # per point, and per point and chain
        (torch.Size([3]), torch.Size([3, 4]))
        >>> bool(((ais.acceptance > 0) & (ais.acceptance <= 1)).all())
        True
    """
    check_annealing(x, num_chains, num_steps, leapfrog_steps, target_accept, init, batch_size)
    betas = annealing_schedule(schedule, num_steps)
    blocks = [
        anneal(
            model,
            guide,
            block,
            _initial_state(model, guide, block, num_chains, init, max_plate_nesting),
            betas,
            leapfrog_steps,
            step_size or INITIAL_STEP_SIZE,
            target_accept,
            init,
            max_plate_nesting,
            progress,
        )
        for block in x.split(batch_size)
    ]
    log_weights = torch.cat([b[0] for b in blocks], 1).T.contiguous()
    log_px, stderr = log_mean_exp(log_weights)
    return AnnealedLikelihood(
        log_px=log_px,
        stderr=stderr,
        log_weights=log_weights,
        acceptance=torch.cat([b[1] for b in blocks]),
        step_size=torch.cat([b[2] for b in blocks]),
        num_chains=num_chains,
        num_steps=num_steps,
        evaluations=num_steps * (leapfrog_steps + 2),
    )


def _initial_state(
    model: Program, guide: Program, x: Tensor, num_chains: int, init: str, max_plate_nesting: int
) -> dict[str, Tensor]:
    """The chains' starting latents, ``(C, B, ...)`` per site: draws from the guide (its
    structure checked) or from the prior."""
    with torch.no_grad(), pyro.validation_enabled(False):
        if init == "guide":
            scores = score(
                model, guide, x, num_particles=num_chains, max_plate_nesting=max_plate_nesting
            )
            check_sites(scores)
            return latent_values(scores.guide_trace)
        with pyro.plate(PARTICLE_PLATE, num_chains, dim=-(max_plate_nesting + 1)):
            trace, observed = prior_trace(model, x)
        return latent_values(trace, observed)


def anneal(
    model: Program,
    guide: Program,
    x: Tensor,
    z: dict[str, Tensor],
    betas: Tensor,
    leapfrog_steps: int,
    step_size: float,
    target_accept: float,
    init: str,
    max_plate_nesting: int,
    progress: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Moves chains started at ``z`` through the inverse temperatures ``betas`` (rising for
    forward AIS, falling for reverse), adding ``(b_new - b_old) * delta(z)`` to each log
    weight before the transition at ``b_new``; ``delta`` is log p(x, z) - log q(z|x) from the
    guide, log p(x|z) from the prior."""
    num_chains, num_points = next(iter(z.values())).shape[:2]
    events = {name: v.shape[2:] for name, v in z.items()}
    state = {name: v.reshape(num_chains, num_points, -1) for name, v in z.items()}

    def terms(flat: dict[str, Tensor]) -> Terms:
        values = {n: v.reshape(num_chains, num_points, *events[n]) for n, v in flat.items()}
        scores = score(
            model,
            poutine.replay(guide, trace=_values_trace(values)),
            x,
            num_particles=num_chains,
            max_plate_nesting=max_plate_nesting,
            scaled=False,
        )
        log_q = sum(scores.log_guide.values())
        return log_q, sum(scores.log_prior.values()), scores.log_likelihood

    def delta(t: Terms) -> Tensor:
        log_q, log_prior, log_lik = t
        return log_prior + log_lik - log_q if init == "guide" else log_lik

    def log_density(beta: float) -> Callable[[dict[str, Tensor]], Tensor]:
        def f(flat: dict[str, Tensor]) -> Tensor:
            log_q, log_prior, log_lik = terms(flat)
            if init == "guide":
                return (1 - beta) * log_q + beta * (log_prior + log_lik)
            return log_prior + beta * log_lik

        return f

    log_weights = torch.zeros(num_chains, num_points, dtype=torch.float64)
    sizes = torch.full((num_points,), float(step_size), dtype=torch.float64)
    accepted = torch.zeros(num_points, dtype=torch.float64)
    bar = tqdm(total=len(betas) - 1, unit="step", disable=None if progress else True, leave=False)
    with gradients_for_z_only(model, guide), pyro.validation_enabled(False), bar:
        for old, new in zip(betas[:-1].tolist(), betas[1:].tolist(), strict=True):
            with torch.no_grad():
                log_weights += (new - old) * delta(terms(state)).double().cpu()
            state, accept_prob = hmc_transition(state, log_density(new), sizes, leapfrog_steps)
            rate = accept_prob.double().mean(0).cpu()
            accepted += rate
            sizes = sizes * torch.exp(_ADAPT_RATE * (rate - target_accept))
            bar.update()
    return log_weights, accepted / (len(betas) - 1), sizes


def prior_trace(model: Program, x: Tensor) -> tuple[Trace, list[str]]:
    """The model run with its data unobserved (latents and data drawn from p(z) p(x|z)),
    and the names of the sites that were observed."""
    observed = [
        name
        for name, site in poutine.trace(model).get_trace(x).nodes.items()
        if site["type"] == "sample" and site["is_observed"]
    ]
    return poutine.trace(poutine.uncondition(model)).get_trace(x), observed


def latent_values(trace: Trace, observed: list[str] = ()) -> dict[str, Tensor]:
    """The values of a trace's latent sample sites (not data, not plates).

    Raises:
        ValueError: a discrete latent site, which HMC cannot move.
    """
    latent = {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and name not in observed
        and not site_is_subsample(site)
    }
    discrete = [n for n, site in latent.items() if site["fn"].support.is_discrete]
    if discrete:
        raise ValueError(
            f"AIS moves the latents by HMC, and site(s) {discrete} are discrete; estimate "
            "log p(x) by importance sampling instead (method 'is')"
        )
    return {name: site["value"].detach() for name, site in latent.items()}


def _values_trace(values: dict[str, Tensor]) -> Trace:
    """A trace holding ``values`` as sampled latent sites, for ``poutine.replay``: the guide
    then scores the chain's state as if it had drawn it."""
    trace = Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", is_observed=False, value=value, infer={})
    return trace


def log_mean_exp(log_weights: Tensor, negated: bool = False) -> tuple[Tensor, Tensor]:
    """Per row: log-mean-exp of ``(N, C)`` log weights (or minus it, with ``negated``) and
    its delta-method standard error."""
    num_chains = log_weights.shape[-1]
    log_mean = torch.logsumexp(log_weights, -1) - math.log(num_chains)
    normalized = (log_weights - log_mean.unsqueeze(-1)).exp()
    if num_chains > 1:
        stderr = normalized.std(-1) / math.sqrt(num_chains)
    else:
        stderr = torch.full_like(log_mean, math.nan)
    return (-log_mean if negated else log_mean), stderr


def check_annealing(
    x: Tensor,
    num_chains: int,
    num_steps: int,
    leapfrog_steps: int,
    target_accept: float,
    init: str,
    batch_size: int,
) -> None:
    for name, value in (
        ("num_chains", num_chains),
        ("num_steps", num_steps),
        ("leapfrog_steps", leapfrog_steps),
        ("batch_size", batch_size),
    ):
        check_int(value, name)
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
    if init not in ("guide", "prior"):
        raise ValueError(f"init must be 'guide' or 'prior', got {init!r}")
    if not isinstance(x, Tensor | Labelled) or x.dim() < 2 or len(x) == 0:
        raise ValueError(f"x must be a non-empty (num_points, *features) tensor, got {x!r:.80}")
