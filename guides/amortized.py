"""The amortized guide q(z|x) as a Pyro program."""

from __future__ import annotations

from collections.abc import Sequence

import pyro
from torch import Tensor, nn

from pyrovae.model.distributions import as_pyro
from pyrovae.model.sites import DATA_PLATE, latent_sites


class AmortizedGuide(nn.Module):
    """The guide q(z|x): inside the data plate it draws ``z ~ encoder(x)``.

    With ``layers`` it is the bottom-up guide of a stacked model: ``z1 ~ encoder(x)``, then
    ``z_{l+1} ~ layers[l - 1](z_l)``, on the sites the model's stack uses.

    Args:
        encoder: ``encoder(x) -> Distribution`` over z with batch shape ``(B,)`` and event
            shape ``(latent_dim,)`` for ``x`` of shape ``(B, F)``.
        layers: conditionals ``q(z_{l+1} | z_l)``, bottom first.

    Example:
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> guide = AmortizedGuide(DiagonalNormal(in_features=5, latent_dim=2))
    """

    def __init__(self, encoder: nn.Module, layers: Sequence[nn.Module] = ()) -> None:
        super().__init__()
        self.encoder = encoder
        self.layers = nn.ModuleList(layers)
        self.latent_sites = latent_sites(len(self.layers) + 1)

    def forward(self, x: Tensor) -> Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            first, *above = self.latent_sites
            z = bottom = pyro.sample(first, as_pyro(self.encoder(x)))
            for name, layer in zip(above, self.layers, strict=True):
                z = pyro.sample(name, as_pyro(layer(z)))
            return bottom
