"""KL(q(z) || p(z)) of the population's aggregate posterior, bracketed from both sides.

The aggregate posterior q(z) = E_{p_data(x)}[q(z|x)] is what a prior should match ("how well
does q(z) match the prior?"). :func:`diagnose` scores it as the mixture of the N posteriors
it is given; that mixture's mutual information cannot exceed log N, and with narrow
posteriors it sits there, so its marginal KL is the mean KL minus log N whatever the prior.
By the joint convexity of the KL its expectation over the N points is still an upper bound
on the population's KL(q || p). :func:`aggregate_kl` adds a lower bound that no N caps:

- a critic T(z), a small network, learns to tell draws of q(z) (posterior draws of the
  points of a training pool) from draws of p(z), by logistic regression; at the optimum its
  logit is log q(z) - log p(z);
- for any T, ``KL(q || p) >= E_q[T] - log E_p[exp T]`` (Donsker and Varadhan), so the bound
  is evaluated on draws the critic never saw: posterior draws of held-out points and fresh
  prior draws. Training stops when the same bound on a validation share of the pool stops
  rising, and keeps the best critic.

The bound needs only draws, so it works for any latent site (a flow guide, a VampPrior, the
upper layer of a stack); the upper bound needs the closed-form aggregate of ``diagnose``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from torch import Tensor

from pyrovae.inference.algorithms.density import donsker_varadhan, fit_critic
from pyrovae.inference.algorithms.marginal import like_parameters
from pyrovae.inference.algorithms.scoring import MAX_PLATE_NESTING, PARTICLE_PLATE, score
from pyrovae.inference.errors import check_int
from pyrovae.inference.reporting.diagnostics import ancestral_draws, diagnose, primary_site

__all__ = [
    "AggregateKL",
    "aggregate_kl",
    "check_held_out",
    "posterior_draws",
    "rng_devices",
]

Program = Callable[..., Any]


@dataclass(frozen=True)
class AggregateKL:
    """Bounds on KL(q(z) || p(z)) for one latent site, in nats.

    Attributes:
        site: the latent site.
        lower: the Donsker-Varadhan bound E_q[T] - log E_p[exp T] on held-out draws; a
            Monte Carlo estimate, so it can exceed the KL by its noise.
        lower_se: its standard error (delta method over both Monte Carlo means).
        upper: the marginal KL of the N-point aggregate of the held-out points
            (:func:`diagnose`), an upper bound in expectation; NaN where not computed.
        mean_kl: the mean of KL(q(z|x) || p(z)) over the held-out points (NaN likewise);
            it is I(x; z) + KL(q(z) || p(z)), so ``mean_kl - lower`` bounds I(x; z) above.
        num_points: held-out points (one posterior draw each per ``num_draws``).
        num_prior_draws: prior draws of the held-out bound.
        epochs: critic epochs run; the best of them (by the validation bound) is kept.
        validation: the validation bound after each epoch.
    """

    site: str
    lower: float
    lower_se: float
    upper: float
    mean_kl: float
    num_points: int
    num_prior_draws: int
    epochs: int
    validation: tuple[float, ...]

    def summary(self) -> dict[str, float]:
        """The figures as plain floats, for tables and JSON."""
        return {
            "aggregate_kl_lower": self.lower,
            "aggregate_kl_lower_se": self.lower_se,
            "aggregate_kl_upper": self.upper,
            "mean_kl": self.mean_kl,
            "critic_epochs": float(self.epochs),
        }


def aggregate_kl(
    model: Program,
    guide: Program,
    x: Tensor,
    x_test: Tensor,
    *,
    site: str | None = None,
    num_draws: int = 4,
    num_prior_draws: int = 100_000,
    validation: float = 0.1,
    hidden: int = 256,
    epochs: int = 50,
    patience: int = 3,
    batch_size: int = 1024,
    lr: float = 1e-3,
    upper: bool = True,
    seed: int = 0,
) -> AggregateKL:
    """Bounds the KL from the aggregate posterior of a latent site to its prior.

    Args:
        model: a Pyro model ``model(x)``, every sample site in the data plate.
        guide: a Pyro guide ``guide(x)`` with a site for each latent site of the model.
        x: ``(N, *features)`` the critic's pool, e.g. the training set; a ``validation``
            share of it (the last points) decides when the critic stops.
        x_test: ``(M, *features)`` held-out points for the bound, e.g. the test set.
        site: the latent site; default the one the decoder reads (as :func:`diagnose`).
        num_draws: posterior draws per point, for the pool and the held-out bound alike.
        num_prior_draws: prior draws of the held-out bound, and of the validation bound
            (the critic trains on as many prior draws as posterior draws).
        validation: the share of ``x`` held out to stop the critic.
        hidden: width of the critic's two hidden layers.
        epochs: the most passes over the pool.
        patience: epochs without a better validation bound before stopping.
        batch_size: draws of each kind per critic step.
        lr: Adam's learning rate for the critic.
        upper: also compute the N-point upper bound on ``x_test`` (quadratic in M).
        seed: seeds the draws and the critic; the global random state is left as it was.

    Returns:
        The :class:`AggregateKL`.

    Raises:
        ValueError: data that is not a batch of points, too few points for a validation
            share, a site the model does not sample, or a non-positive size.

    References:
        ELBO surgery: yet another way to carve up the variational evidence lower bound
        (Hoffman and Johnson, 2016); Asymptotic evaluation of certain Markov process
        expectations for large time (Donsker and Varadhan, 1983); Distribution matching in
        variational inference (Rosca, Lakshminarayanan and Mohamed, 2018)

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> x_train, x_test = torch.randn(200, 5), torch.randn(50, 5)
        >>> kl = aggregate_kl(vae, guide, x_train, x_test, num_prior_draws=1000, epochs=2)
        >>> kl.site, kl.num_points
        ('z', 50)
        >>> bool(kl.mean_kl >= kl.upper)  # the N-point marginal KL is the mean KL less I(x; z)
        True
    """
    num_validation = check_held_out(
        x,
        x_test,
        validation,
        num_draws=num_draws,
        num_prior_draws=num_prior_draws,
        hidden=hidden,
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
    )
    x, x_test = like_parameters(x, model, guide), like_parameters(x_test, model, guide)
    with torch.random.fork_rng(devices=rng_devices(x)):
        pyro.set_rng_seed(seed)
        with torch.no_grad(), pyro.validation_enabled(False):
            names = score(model, guide, x[:2], scaled=False).latent_sites
            name = site or primary_site(model, names)
            if name not in names:
                raise ValueError(
                    f"site {name!r} is not a latent site of the model; choose one of {names}"
                )
            x_train, x_valid = x[: len(x) - num_validation], x[len(x) - num_validation :]
            valid = posterior_draws(model, guide, x_valid, name, num_draws)
            held_out = posterior_draws(model, guide, x_test, name, num_draws)
            prior_valid, prior_test = ancestral_draws(
                model, x[:batch_size], [name], 2 * num_prior_draws
            )[name].split(num_prior_draws)

        def draws() -> tuple[Tensor, Tensor]:
            # Fresh draws of both every epoch: a critic that sees the same draws again
            # learns their lumps, and its bound on new draws falls.
            with torch.no_grad(), pyro.validation_enabled(False):
                q = posterior_draws(model, guide, x_train, name, num_draws)
                p = ancestral_draws(model, x[:batch_size], [name], len(q))[name]
            return q, p

        critic, history = fit_critic(
            draws, (valid, prior_valid), hidden, epochs, patience, batch_size, lr
        )
        with torch.no_grad():
            lower, lower_se = donsker_varadhan(critic(held_out), critic(prior_test))
            upper_bound = mean_kl = math.nan
            if upper:
                d = diagnose(model, guide, x_test, num_samples=0, num_latent_samples=num_draws)
                upper_bound, mean_kl = d.sites[name].marginal_kl, d.sites[name].kl.mean().item()
    return AggregateKL(
        site=name,
        lower=lower,
        lower_se=lower_se,
        upper=upper_bound,
        mean_kl=mean_kl,
        num_points=len(x_test),
        num_prior_draws=len(prior_test),
        epochs=len(history),
        validation=tuple(history),
    )


def check_held_out(x: Tensor, x_test: Tensor, validation: float, **sizes: int) -> int:
    """Checks what a fit on ``x``, stopped on its last ``validation`` share and measured on
    ``x_test``, needs: batches of points, a share in (0, 1) leaving at least 2 points on
    each side and 2 held out, and positive integer ``sizes``; returns the validation count.

    Raises:
        ValueError: naming the first value that fails.
    """
    for name, value in sizes.items():
        check_int(value, name)
    for what, points in (("x", x), ("x_test", x_test)):
        if points.dim() < 2:
            raise ValueError(
                f"{what} must be (N, *features), got shape {tuple(points.shape)}; "
                "pass a batch of points, e.g. x[None] for one"
            )
    if not 0 < validation < 1:
        raise ValueError(f"validation must be a share in (0, 1), got {validation!r}")
    num_validation = round(validation * len(x))
    if num_validation < 2 or len(x) - num_validation < 2 or len(x_test) < 2:
        raise ValueError(
            f"need at least 2 training, 2 validation and 2 held-out points; got {len(x)} in "
            f"x ({num_validation} for validation) and {len(x_test)} in x_test"
        )
    return num_validation


def posterior_draws(model: Program, guide: Program, x: Tensor, name: str, num_draws: int) -> Tensor:
    """``(N * num_draws, D)`` draws of the site from q(z|x_n), point by point (the draws of
    the last points are the last rows), a block of points at a time. Only the guide runs:
    scoring the draws under a VampPrior alone would cost a pass over all its components."""
    draws = []
    for block in x.split(max(1, 4096 // num_draws)):
        with pyro.plate(PARTICLE_PLATE, num_draws, dim=-(MAX_PLATE_NESTING + 1)):
            value = poutine.trace(guide).get_trace(block).nodes[name]["value"]
        draws.append(value.reshape(num_draws, len(block), -1).transpose(0, 1))
    return torch.cat(draws).flatten(0, 1)


def rng_devices(x: Tensor) -> list[int]:
    """The CUDA devices whose random state ``torch.random.fork_rng`` keeps for data ``x``."""
    return [x.device.index or 0] if x.device.type == "cuda" else []
