"""A richer prior fitted to a trained model's aggregate posterior, and how much closer it is.

For any two priors p and p' and any aggregate posterior q(z),

    KL(q(z) || p(z)) - KL(q(z) || p'(z)) = E_q(z)[log p'(z) - log p(z)],

because the entropy of q cancels. The right side needs only draws from q(z), which are
posterior draws of data points, and the two densities; its Monte Carlo mean over held-out
points is unbiased for the population's aggregate posterior, with no log N ceiling (unlike
the N-point aggregate of :func:`diagnose`) and no critic (unlike :func:`aggregate_kl`).

:func:`fit_prior` fits a new prior p' to posterior draws of training points by maximum
likelihood, the encoder and decoder fixed ("ex-post density estimation", Ghosh et al.), and
reports that difference on held-out points: how many nats of the mismatch between q(z) and
the model's prior p a richer prior closes, for the same q. Put into the model in place of p,
it changes the ELBO of every point by exactly its E_q(z|x)[log p'(z) - log p(z)], so the
mean gain is the rise of the mean held-out ELBO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from torch import Tensor, nn

from pyrovae.inference.algorithms.density import fit_density
from pyrovae.inference.algorithms.marginal import like_parameters, standard_error
from pyrovae.inference.reporting.aggregate import check_held_out, posterior_draws, rng_devices
from pyrovae.model.distributions import as_pyro

__all__ = ["PriorFit", "fit_prior"]

Program = Callable[..., Any]


@dataclass(frozen=True)
class PriorFit:
    """A prior fitted to an aggregate posterior, and its gain over the model's prior.

    Attributes:
        prior: the fitted prior (the module passed in, trained in place).
        site: the latent site whose aggregate posterior it fits (the model's top site).
        gain: ``E_q(z)[log p'(z) - log p(z)]`` on the held-out points' draws, which is
            ``KL(q(z) || p(z)) - KL(q(z) || p'(z))`` in nats: positive when the fitted
            prior p' is closer to the aggregate posterior than the model's prior p. Since a
            KL is at least 0, it is also a lower bound on ``KL(q(z) || p(z))``.
        gain_se: its standard error over the held-out points.
        per_point: ``(M,)`` each held-out point's mean over its draws.
        epochs: passes over the training draws; the best by validation is kept.
        validation: the validation gain after each epoch.
    """

    prior: nn.Module
    site: str
    gain: float
    gain_se: float
    per_point: Tensor
    epochs: int
    validation: tuple[float, ...]

    def summary(self) -> dict[str, float]:
        """The figures as plain floats, for tables and JSON."""
        return {"prior_gain": self.gain, "prior_gain_se": self.gain_se, "epochs": self.epochs}


def fit_prior(
    model: Program,
    guide: Program,
    prior: nn.Module,
    x: Tensor,
    x_test: Tensor,
    *,
    num_draws: int = 4,
    validation: float = 0.1,
    epochs: int = 100,
    patience: int = 5,
    batch_size: int = 1000,
    lr: float = 1e-3,
    seed: int = 0,
) -> PriorFit:
    """Fits ``prior`` to the aggregate posterior of a trained model by maximum likelihood and
    measures how much closer to it than the model's prior it is on held-out points.

    Args:
        model: a trained model with a ``prior`` module and ``latent_sites`` (a :class:`VAE`);
            the prior is that of its top site, ``model.latent_sites[-1]``.
        guide: its guide; only the guide runs, for posterior draws of the top site.
        prior: the prior to fit, e.g. ``FlowPrior(D)``, ``MixtureOfNormals(D, 10)`` or
            ``VampPrior(D, F, encoder=guide.encoder)``. It is trained in place, from
            ``prior.initialize_from_data(x)`` where it has one (a VampPrior's pseudo-inputs
            start at training points); parameters it shares with the model or the guide (a
            VampPrior's encoder) stay fixed.
        x: ``(N, *features)`` training points; the last ``validation`` share stops training.
        x_test: ``(M, *features)`` held-out points for the gain.
        num_draws: posterior draws per point, fresh each epoch for the training points.
        validation: share of ``x`` held out to stop training.
        epochs: the most passes over the training draws.
        patience: epochs without a better validation gain before stopping.
        batch_size: draws per step.
        lr: Adam's learning rate.
        seed: seeds the draws; the global random state is left as it was.

    Returns:
        The :class:`PriorFit`.

    Raises:
        ValueError: a model without a ``prior`` and ``latent_sites``, a prior with nothing
            of its own to fit, data that is not a batch of points, too few points, or a
            non-positive size.

    References:
        From Variational to Deterministic Autoencoders (Ghosh et al., 2020); ELBO surgery:
        yet another way to carve up the variational evidence lower bound (Hoffman and
        Johnson, 2016)

    Example:
        >>> import torch
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> from pyrovae.model import VAE, Gaussian, LearnedNormal, StandardNormal
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> guide = AmortizedGuide(DiagonalNormal(5, 2))
        >>> x_train, x_test = torch.randn(200, 5), torch.randn(50, 5)
        >>> fitted = fit_prior(vae, guide, LearnedNormal(2), x_train, x_test, epochs=2)
        >>> fitted.site, fitted.per_point.shape  # the gain's per-point terms
        ('z', torch.Size([50]))
    """
    if not callable(getattr(model, "prior", None)) or not getattr(model, "latent_sites", None):
        raise ValueError(
            "fit_prior needs a model with a prior module and latent_sites, such as a VAE; "
            f"got {type(model).__name__}"
        )
    num_validation = check_held_out(
        x,
        x_test,
        validation,
        num_draws=num_draws,
        epochs=epochs,
        patience=patience,
        batch_size=batch_size,
    )
    shared = {
        id(p) for part in (model, guide) if isinstance(part, nn.Module) for p in part.parameters()
    }
    own = [p for p in prior.parameters() if id(p) not in shared]
    if not own:
        raise ValueError(
            f"{type(prior).__name__} has no parameters of its own to fit; pass a new prior "
            "module, not the model's"
        )
    x, x_test = like_parameters(x, model, guide), like_parameters(x_test, model, guide)
    prior.to(x.device)
    site = model.latent_sites[-1]
    frozen = [p for p in prior.parameters() if id(p) in shared]
    requires = [p.requires_grad for p in frozen]

    def draws(points: Tensor) -> Tensor:
        with torch.no_grad(), pyro.validation_enabled(False):
            return posterior_draws(model, guide, points, site, num_draws)

    def gain(z: Tensor) -> Tensor:
        """log p'(z) - log p(z) per draw, in blocks of ``batch_size``."""
        with torch.no_grad():
            fitted, reference = as_pyro(prior()), as_pyro(model.prior())
            return torch.cat(
                [fitted.log_prob(b) - reference.log_prob(b) for b in z.split(batch_size)]
            )

    with torch.random.fork_rng(devices=rng_devices(x)):
        pyro.set_rng_seed(seed)
        x_train, x_valid = x[: len(x) - num_validation], x[len(x) - num_validation :]
        start = getattr(prior, "initialize_from_data", None)
        if start is not None:  # a VampPrior's pseudo-inputs start at training points
            start(x_train)
        valid, held_out = draws(x_valid), draws(x_test)
        try:
            for p in frozen:
                p.requires_grad_(False)
            history = fit_density(
                prior,
                own,
                lambda: draws(x_train),
                lambda: gain(valid).mean().item(),
                epochs,
                patience,
                batch_size,
                lr,
            )
        finally:
            for p, flag in zip(frozen, requires, strict=True):
                p.requires_grad_(flag)
        per_point = gain(held_out).reshape(len(x_test), num_draws).mean(1).double().cpu()
    return PriorFit(
        prior=prior,
        site=site,
        gain=per_point.mean().item(),
        gain_se=standard_error(per_point),
        per_point=per_point,
        epochs=len(history),
        validation=tuple(history),
    )
