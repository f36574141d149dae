"""Encoders: modules mapping x of shape ``(B, F)`` to a distribution over z, batch shape ``(B,)``."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
from torch import Tensor, nn
from torch.nn.functional import softplus

from model.networks import mlp


class DiagonalNormal(nn.Module):
    """A Gaussian q(z|x) with diagonal covariance, its loc and scale given by an MLP.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        hidden: hidden layer sizes.
        activation: activation between layers (see ``model.networks.ACTIVATIONS``).
        min_scale: floor added to the softplus scale, for numerical safety.
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "softplus",
        min_scale: float = 1e-4,
    ) -> None:
        super().__init__()
        self.net = mlp(in_features, 2 * latent_dim, hidden, activation)
        self.min_scale = min_scale

    def forward(self, x: Tensor) -> dist.Distribution:
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + self.min_scale).to_event(1)


ENCODERS: dict[str, type[nn.Module]] = {
    "diagonal_normal": DiagonalNormal,
}
"""Spec name -> encoder constructor; the constructor's signature is the spec's schema."""
