"""The VAE as a Pyro model: a prior p(z), a decoder and a likelihood p(x|z)."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyrovae.model.distributions import as_pyro
from pyrovae.model.sites import DATA_PLATE, OBSERVED, latent_sites


class VAE(nn.Module):
    """The generative model p(x, z) = p(z) p(x|z) as a Pyro program.

    ``forward(x)`` is the model: inside a plate over the rows of ``x`` it draws
    ``z ~ prior()`` and observes ``x ~ likelihood(decoder(z))``. Any modules that fit the
    protocols below plug in; nothing checks their classes.

    With ``layers``, latents are stacked (Burda et al.'s two-layer model): the prior sits on
    the top latent, each layer draws the one below it, and the decoder reads the bottom one,
    ``z_L ~ prior(), z_l ~ layers[l - 1](z_{l+1}), x ~ likelihood(decoder(z_1))``, with the
    sites named by :func:`~pyrovae.model.sites.latent_sites` (``z1``, ``z2``, ...).

    Args:
        prior: ``prior() -> Distribution`` with event shape ``(latent_dim,)``; a plain
            ``torch.distributions`` object is wrapped for Pyro.
        decoder: ``decoder(z) -> Tensor``, mapping ``(..., latent_dim)`` to likelihood
            parameters ``(..., F * num_params)``.
        likelihood: ``likelihood(params) -> Distribution`` with event shape ``(F,)``.
        layers: conditionals ``p(z_l | z_{l+1})``, bottom first: ``layers[0](z2)`` is the
            distribution of z1 (e.g. :class:`~pyrovae.model.layers.ConditionalNormal`).

    Example:
        >>> from pyrovae.model import VAE, StandardNormal, Gaussian
        >>> vae = VAE(StandardNormal(2), torch.nn.Linear(2, 5), Gaussian(scale=0.5))
        >>> vae.sample(3).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        prior: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        layers: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        self.prior = prior
        self.decoder = decoder
        self.likelihood = likelihood
        self.layers = nn.ModuleList(layers)
        self.latent_sites = latent_sites(len(self.layers) + 1)

    def decode(self, z: Tensor) -> dist.Distribution:
        """The likelihood p(x|z) for latents ``z`` of shape ``(..., latent_dim)``."""
        return as_pyro(self.likelihood(self.decoder(z)))

    def forward(self, x: Tensor) -> Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            z = self._latents()
            pyro.sample(OBSERVED, self.decode(z), obs=x)
        return z

    def _latents(self) -> Tensor:
        """Draws the latents top-down inside the data plate; returns the bottom one."""
        *below, top = self.latent_sites
        z = pyro.sample(top, as_pyro(self.prior()))
        for name, layer in zip(reversed(below), reversed(self.layers), strict=True):
            z = pyro.sample(name, as_pyro(layer(z)))
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
            z = self._latents()
        px = self.decode(z)
        return px.mean if mean else px.sample()
