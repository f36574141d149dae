"""The one scoring path: log densities of a model/guide pair per particle and per data point.

:func:`score` runs the guide and the model replayed against it once, under a plate of
``num_particles`` outside the model's own plates (Pyro's ``get_importance_trace``, as its
``vectorized_importance_weights`` and ``psis_diagnostic`` do), and returns every sample
site's log density as a ``(particles, points)`` tensor. The training objectives
(:class:`~pyrovae.inference.algorithms.objectives.ParticleBound`), the marginal-likelihood
estimator, validation and :func:`~pyrovae.inference.reporting.diagnostics.diagnose` all read
their figures from it, so a rule about sites (which are latent, where the data plate is, how
scales apply) is written once.

Every sample site must sit in the data plate (``pyrovae.model.sites.DATA_PLATE``): a per-point
figure is not defined for a global latent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.enum import get_importance_trace
from pyro.poutine.trace_struct import Trace
from torch import Tensor

from pyrovae.model.sites import DATA_PLATE

__all__ = [
    "MAX_PLATE_NESTING",
    "PARTICLE_PLATE",
    "Scores",
    "SiteError",
    "check_sites",
    "score",
]

MAX_PLATE_NESTING = 1
"""Models and guides use one plate (the data plate); particles are vectorized outside it."""

PARTICLE_PLATE = "particles"
"""The plate over particles, at dimension ``-(max_plate_nesting + 1)``."""

Program = Callable[..., Any]


class SiteError(ValueError):
    """A model or guide whose sites cannot be scored per data point."""


@dataclass(frozen=True)
class Scores:
    """Log densities of one vectorized run of a guide and the model replayed against it.

    Every tensor has shape ``(particles, points)``.

    Attributes:
        log_likelihood: the observed sites' log p(x | z), summed over observed sites.
        log_prior: latent site name -> log p(z_site | its parents) under the model, in the
            model's execution order.
        log_guide: latent site name -> log q(z_site | x, ...) under the guide.
        model_trace: the model's trace (values, distributions, plates).
        guide_trace: the guide's trace.
    """

    log_likelihood: Tensor
    log_prior: dict[str, Tensor]
    log_guide: dict[str, Tensor]
    model_trace: Trace
    guide_trace: Trace

    @property
    def latent_sites(self) -> list[str]:
        """The model's latent sample sites, in execution order."""
        return list(self.log_prior)

    def site_kl(self, name: str) -> Tensor:
        """``log q(z_site | ...) - log p(z_site | ...)``: the site's single-draw KL term."""
        return self.log_guide[name] - self.log_prior[name]

    @property
    def kl(self) -> Tensor:
        """``log q(z|x) - log p(z)`` over all latent sites: the single-draw KL term."""
        return _total(self.log_guide.values(), self.log_likelihood) - _total(
            self.log_prior.values(), self.log_likelihood
        )

    @property
    def log_weight(self) -> Tensor:
        """``log p(x, z) - log q(z|x)``: the importance log weight of each particle."""
        return self.log_likelihood - self.kl


def _total(terms: Any, like: Tensor) -> Tensor:
    total = torch.zeros_like(like)
    for term in terms:
        total = total + term
    return total


def score(
    model: Program,
    guide: Program,
    *args: Any,
    num_particles: int = 1,
    max_plate_nesting: int = MAX_PLATE_NESTING,
    scaled: bool = True,
    path_only: bool = False,
    dtype: torch.dtype | None = None,
    **kwargs: Any,
) -> Scores:
    """Runs ``guide(*args, **kwargs)`` and the replayed model under a particle plate and
    scores every sample site per particle and data point.

    Args:
        model: a Pyro model; every sample site inside the data plate.
        guide: a Pyro guide taking the same arguments.
        *args: the programs' arguments, e.g. the data ``x``.
        num_particles: particles per data point, vectorized in one plate.
        max_plate_nesting: plates the programs nest; particles go in the next dimension.
        scaled: apply the sites' scales (``poutine.scale``, KL schedules) as training does;
            False gives the unscaled model that evaluation estimates. Masks always apply.
        path_only: let each guide log density depend on the parameters only through the
            sampled value (its value is unchanged): the sticking-the-landing gradient.
        dtype: cast each site's log density to this dtype before summing (float64 for
            statistics); default: keep the model's dtype.
        **kwargs: keyword arguments of the programs.

    Returns:
        The :class:`Scores`, with gradients unless called under ``torch.no_grad()``.

    Raises:
        SiteError: a sample site outside the data plate, or with a batch shape wider than
            its plates.
    """
    particle_dim = -(max_plate_nesting + 1)
    plate = pyro.plate(PARTICLE_PLATE, num_particles, dim=particle_dim)
    model_trace, guide_trace = get_importance_trace(
        "flat", max_plate_nesting + 1, plate(model), plate(guide), args, kwargs
    )

    def per_point(name: str, site: dict[str, Any], log_p: Tensor) -> Tensor:
        log_p = _per_point(name, site, log_p, particle_dim)
        return log_p if dtype is None else log_p.to(dtype)

    log_prior: dict[str, Tensor] = {}
    log_likelihood: Tensor | float = 0.0
    for name, site in _sample_sites(model_trace):
        log_p = per_point(name, site, _site_log_prob(site, scaled))
        if site["is_observed"]:
            log_likelihood = log_likelihood + log_p
        else:
            log_prior[name] = log_p
    log_guide: dict[str, Tensor] = {}
    for name, site in _sample_sites(guide_trace):
        log_q = _site_log_prob(site, scaled)
        if path_only:
            value = site["value"].detach()
            at_value = site["fn"].log_prob(value, *site["args"], **site["kwargs"])
            at_value = scale_and_mask(at_value, site["scale"] if scaled else 1.0, site["mask"])
            log_q = log_q + (at_value.detach() - at_value)
        log_guide[name] = per_point(name, site, log_q)

    if not isinstance(log_likelihood, Tensor):
        reference = next(iter(log_prior.values()), None)
        if reference is None:
            raise SiteError("the model has no sample site to score")
        log_likelihood = torch.zeros_like(reference)
    shape = torch.broadcast_shapes(
        log_likelihood.shape, *(t.shape for t in (*log_prior.values(), *log_guide.values()))
    )
    return Scores(
        log_likelihood=log_likelihood.expand(shape),
        log_prior={k: v.expand(shape) for k, v in log_prior.items()},
        log_guide={k: v.expand(shape) for k, v in log_guide.items()},
        model_trace=model_trace,
        guide_trace=guide_trace,
    )


def check_sites(scores: Scores) -> None:
    """Checks that the pair defines log p(x) per point: an observed site, and a guide site
    for every latent site of the model and none besides.

    Raises:
        SiteError: with one line naming the sites and the fix.
    """
    observed = [n for n, s in _sample_sites(scores.model_trace) if s["is_observed"]]
    if not observed:
        raise SiteError(
            "the model has no observed site; observe the data with "
            "pyro.sample(name, distribution, obs=x) inside the data plate"
        )
    missing = [name for name in scores.log_prior if name not in scores.log_guide]
    if missing:
        raise SiteError(
            f"the guide has no site for the model's latent site(s) {missing}; "
            "add a guide sample site of the same name for each"
        )
    extra = [name for name in scores.log_guide if name not in scores.log_prior]
    if extra:
        raise SiteError(
            f"the guide samples site(s) {extra} that the model does not; "
            "remove them or add them to the model"
        )


def _sample_sites(trace: Trace) -> list[tuple[str, dict[str, Any]]]:
    # get_importance_trace has already pruned the plates' subsample sites.
    return [(name, site) for name, site in trace.nodes.items() if site["type"] == "sample"]


def _site_log_prob(site: dict[str, Any], scaled: bool) -> Tensor:
    if scaled:
        return site["log_prob"]
    return scale_and_mask(site["unscaled_log_prob"], mask=site["mask"])


def _per_point(name: str, site: dict[str, Any], log_p: Tensor, particle_dim: int) -> Tensor:
    """A site's log density as ``(particles, points)``, summed over any other plate."""
    data_dims = [f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not data_dims:
        raise SiteError(
            f"site {name!r} is outside the data plate {DATA_PLATE!r}; a figure per data "
            "point needs every sample site inside it (global latents are not supported)"
        )
    rank = -particle_dim
    if log_p.dim() > rank:
        raise SiteError(
            f"site {name!r} has batch shape {tuple(log_p.shape)}, wider than its plates; "
            "declare event dims with .to_event() or raise max_plate_nesting"
        )
    log_p = log_p.reshape((1,) * (rank - log_p.dim()) + log_p.shape)
    log_p = log_p.movedim((particle_dim, data_dims[0]), (0, 1))
    if rank > 2:
        log_p = log_p.reshape(log_p.shape[:2] + (-1,)).sum(-1)
    return log_p
