"""The amortized guide q(z|x) as a Pyro program."""

from __future__ import annotations

import pyro
from torch import Tensor, nn

from pyrovae.model.distributions import as_pyro
from pyrovae.model.sites import DATA_PLATE, LATENT


class AmortizedGuide(nn.Module):
    """The guide q(z|x): inside the data plate it draws ``z ~ encoder(x)``.

    Args:
        encoder: ``encoder(x) -> Distribution`` over z with batch shape ``(B,)`` and event
            shape ``(latent_dim,)`` for ``x`` of shape ``(B, F)``.

    Example:
        >>> from pyrovae.guides import AmortizedGuide, DiagonalNormal
        >>> guide = AmortizedGuide(DiagonalNormal(in_features=5, latent_dim=2))
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample(LATENT, as_pyro(self.encoder(x)))
