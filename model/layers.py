"""Stochastic layers: a Gaussian over one latent given another, for stacked latent variables.

The same module is every conditional of a stack: in the model, p(z_l | z_{l+1}) top-down; in
the guide, q(z_{l+1} | z_l) bottom-up (Burda et al.'s two-layer VAE and IWAE), or
q(z_l | x, z_{l+1}) top-down from the concatenation ``[x, z_{l+1}]`` (Tomczak and Welling's
hierarchical VAE).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
from torch import Tensor, nn
from torch.nn.functional import softplus

from pyrovae.model.networks import network as build_network


class ConditionalNormal(nn.Module):
    """``Normal(loc(z), softplus(raw(z)) + min_scale).to_event(1)`` over ``latent_dim``
    numbers, with ``loc`` and ``raw`` the two halves of an MLP's output.

    Args:
        in_features: size of the conditioning latent.
        latent_dim: size of the latent it gives a distribution over.
        hidden: hidden layer sizes of the MLP.
        activation: activation between layers (``pyrovae.model.networks.ACTIVATIONS``).
        min_scale: floor added to the softplus scale.
        network: ``"mlp"`` or ``"gated_mlp"`` (``pyrovae.model.networks.NETWORKS``).

    Example:
        >>> import torch
        >>> layer = ConditionalNormal(50, 100, hidden=[100, 100], activation="tanh")
        >>> layer(torch.zeros(3, 50)).event_shape
        torch.Size([100])

    References:
        Importance Weighted Autoencoders (Burda et al., 2016), section 5
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        hidden: Sequence[int] = (100, 100),
        activation: str = "tanh",
        min_scale: float = 1e-4,
        network: str = "mlp",
    ) -> None:
        super().__init__()
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        if network == "conv":
            raise ValueError("a stochastic layer maps vectors: network must be mlp or gated_mlp")
        self.net = build_network(network, in_features, 2 * latent_dim, hidden, activation)
        self.min_scale = min_scale

    def forward(self, z: Tensor) -> dist.Distribution:
        loc, raw_scale = self.net(z).chunk(2, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + self.min_scale).to_event(1)
