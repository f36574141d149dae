"""The validation pass after each training epoch: the plain ELBO, its reconstruction and KL
terms, and the active units, reduced over the ranks of a data-parallel run."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from pyrovae.inference.algorithms.scoring import SiteError, score
from pyrovae.inference.experiment.distributed import all_reduce_sum, rank_and_world

__all__ = ["ACTIVITY_THRESHOLD", "validate"]

ACTIVITY_THRESHOLD = 0.01
"""A unit is active when the variance over x of its posterior mean exceeds this (Burda et al.)."""


@torch.no_grad()
def validate(
    loss_fn: nn.Module, x: Tensor | None, batch_size: int, device: torch.device
) -> dict[str, float]:
    """Validation ELBO, its two terms and the active units, from one draw of z per point;
    for an importance-weighted objective (k > 1), also the bound it trains, unscaled
    (``validation_bound``), which early stopping and the best epoch then follow.

    Scores the pair through the one scoring path, unscaled, which gives the plain ELBO split
    into E_q[log p(x|z)] and KL whatever the training objective; a unit is active when the
    variance over points of its posterior mean E_q[z_d|x] exceeds 0.01 (Burda et al.), NaN
    for a guide without closed-form means. A model it cannot score per point (a latent
    outside the data plate) gets the objective's value instead.
    """
    nan = float("nan")
    k = importance_samples(loss_fn)
    keys = ("validation_elbo", "validation_reconstruction", "validation_kl")
    # The same keys whatever the path: the bound's too where the objective has one.
    blank = {key: nan for key in (*keys, *(("validation_bound",) if k > 1 else ()))}
    if x is None:
        return {**blank, "validation_active_units": nan}
    loss_fn.eval()
    rank, world = rank_and_world()
    count = len(x)
    x = x[rank::world]  # each rank scores its share; the sums are reduced
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    means: dict[str, list[Tensor]] = {}
    try:
        for part in x.split(max(batch_size, 1024)):
            scores = score(loss_fn.model, loss_fn.guide, part.to(device), scaled=False)
            terms = (scores.log_weight, scores.log_likelihood, scores.kl)
            totals += torch.stack([t.sum() for t in terms]).double()
            for name in scores.latent_sites:
                mean = _posterior_mean(scores.guide_trace.nodes[name]["fn"])
                means.setdefault(name, []).append(mean)
    except SiteError:  # a latent outside the data plate: no per-point ELBO, only the loss
        total = torch.zeros((), device=device, dtype=torch.float64)
        for part in x.split(max(batch_size, 1024)):
            total += loss_fn(part.to(device)).double()
        objective = -all_reduce_sum(total).item() / count
        return {
            **blank,
            "validation_elbo": objective,
            **({"validation_bound": objective} if k > 1 else {}),
            "validation_active_units": nan,
        }
    values = dict(zip(keys, (all_reduce_sum(totals) / count).tolist(), strict=True))
    if k > 1:
        bound = torch.zeros((), dtype=torch.float64, device=device)
        for part in x.split(max(batch_size, 1024 // k, 1)):
            log_w = score(
                loss_fn.model, loss_fn.guide, part.to(device), num_particles=k, scaled=False
            ).log_weight
            bound += (torch.logsumexp(log_w, dim=0) - math.log(k)).sum().double()
        values["validation_bound"] = all_reduce_sum(bound).item() / count
    if means and all(None not in parts for parts in means.values()):
        active = sum(_active_units(torch.cat(parts).flatten(1), count) for parts in means.values())
    else:
        active = nan
    return {**values, "validation_active_units": float(active)}


def importance_samples(objective: Any) -> int:
    """k of an importance-weighted objective (``iwae``), or of a loss module built from one;
    0 for any other."""
    bound = getattr(objective, "elbo", objective)
    if getattr(bound, "importance_weighted", False):
        return int(bound.num_particles)
    return 0


def monitored(objective: Any) -> str:
    """The history key early stopping and the best epoch follow: the validation bound the
    objective trains where it is importance-weighted with k > 1 (an IWAE-trained model
    trades ELBO for a tighter bound, so its ELBO is the wrong yardstick), else the ELBO."""
    return "validation_bound" if importance_samples(objective) > 1 else "validation_elbo"


def _active_units(means: Tensor, count: int) -> int:
    """Dimensions whose posterior mean varies over all ranks' points by more than the
    threshold: the unbiased variance from sums reduced over ranks."""
    moments = torch.stack([means.sum(0), means.square().sum(0)]).double()
    total, squares = all_reduce_sum(moments)
    variance = (squares - total.square() / count) / max(count - 1, 1)
    return int((variance > ACTIVITY_THRESHOLD).sum().item())


def _posterior_mean(q: Any) -> Tensor | None:
    """E_q[z|x] per point, ``(points, ...)``, or None where q has no closed-form mean."""
    try:
        return q.mean.reshape(-1, *q.event_shape)[-q.batch_shape[-1] :]
    except (NotImplementedError, AttributeError):
        return None
