"""The VAE as a Pyro model: a prior p(z), a decoder and a likelihood p(x|z)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyrovae.model.distributions import as_pyro
from pyrovae.model.sites import DATA_PLATE, LATENT, OBSERVED


class VAE(nn.Module):
    """The generative model p(x, z) = p(z) p(x|z) as a Pyro program.

    ``forward(x)`` is the model: inside a plate over the rows of ``x`` it draws
    ``z ~ prior()`` and observes ``x ~ likelihood(decoder(z))``. Any modules that fit the
    protocols below plug in; nothing checks their classes.

    Args:
        prior: ``prior() -> Distribution`` with event shape ``(latent_dim,)``; a plain
            ``torch.distributions`` object is wrapped for Pyro.
        decoder: ``decoder(z) -> Tensor``, mapping ``(..., latent_dim)`` to likelihood
            parameters ``(..., F * num_params)``.
        likelihood: ``likelihood(params) -> Distribution`` with event shape ``(F,)``.

    Example:
        >>> from pyrovae.model import VAE, StandardNormal, Gaussian
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> vae.sample(3).shape
        torch.Size([3, 5])
    """

    def __init__(self, prior: nn.Module, decoder: nn.Module, likelihood: nn.Module) -> None:
        super().__init__()
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood

    def decode(self, z: Tensor) -> dist.Distribution:
        """The likelihood p(x|z) for latents ``z`` of shape ``(..., latent_dim)``."""
        return as_pyro(self.likelihood(self.decoder(z)))

    def forward(self, x: Tensor) -> Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = pyro.sample(LATENT, as_pyro(self.prior()))
            pyro.sample(OBSERVED, self.decode(z), obs=x)
        return z

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> Tensor:
        """Generates data: z ~ p(z), then x ~ p(x|z).

        Args:
            num_samples: how many points to generate.
            mean: return the mean of p(x|z) (pixel probabilities for Bernoulli) rather
                than a draw from it.

        Returns:
            A tensor of shape ``(num_samples, F)``.
        """
        with pyro.plate(DATA_PLATE, num_samples):
            z = pyro.sample(LATENT, as_pyro(self.prior()))
        px = self.decode(z)
        return px.mean if mean else px.sample()
