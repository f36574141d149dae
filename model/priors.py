"""Priors p(z): modules whose ``forward()`` returns a distribution with event shape ``(latent_dim,)``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class StandardNormal(nn.Module):
    """The standard normal prior N(0, I) over ``latent_dim`` dimensions.

    Args:
        latent_dim: dimension of z.

    Example:
        >>> StandardNormal(2)().event_shape
        torch.Size([2])
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be at least 1, got {latent_dim}")
        # Buffers follow the module across devices and dtypes.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


PRIORS: dict[str, type[nn.Module]] = {
    "standard_normal": StandardNormal,
}
"""Spec name -> prior constructor; the constructor's signature is the spec's schema."""
