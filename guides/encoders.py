"""Encoders: modules mapping x of shape ``(B, F)`` to a distribution over z, batch shape ``(B,)``.

Every encoder computes its distribution's parameters with a network chosen by ``network``
(``"mlp"``, or ``"conv"`` for images; see ``model.networks.NETWORKS``), where ``hidden`` lists
units per layer for an MLP and channels per stride-2 convolution for a conv network.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import SoftplusLowerCholeskyTransform
from pyrovae.guides.flows import FlowEncoder
from pyrovae.model.networks import network as build_network
from torch import Tensor, nn
from torch.distributions.utils import vec_to_tril_matrix
from torch.nn.functional import softplus


class DiagonalNormal(nn.Module):
    """A Gaussian q(z|x) with diagonal covariance, its loc and scale given by a network.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        hidden: hidden layer sizes (channels for ``network = "conv"``).
        activation: activation between layers (see ``model.networks.ACTIVATIONS``).
        min_scale: floor added to the softplus scale, for numerical safety.
        network: ``"mlp"`` or ``"conv"``.
        image_shape: ``(H, W)`` of image data, needed by ``"conv"``.

    References:
        Auto-Encoding Variational Bayes (Kingma and Welling, 2014)
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "softplus",
        min_scale: float = 1e-4,
        network: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_min_scale(min_scale)
        self.net = build_network(
            network, in_features, 2 * latent_dim, hidden, activation, image_shape
        )
        self.min_scale = min_scale

    def forward(self, x: Tensor) -> dist.Distribution:
        loc, raw_scale = self.net(x).chunk(2, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + self.min_scale).to_event(1)


class FullCovarianceNormal(nn.Module):
    """A Gaussian q(z|x) with full covariance, parameterised by its Cholesky factor.

    The network emits loc and the ``latent_dim * (latent_dim + 1) / 2`` entries of a lower
    triangle, whose diagonal goes through ``softplus(.) + min_scale``.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        hidden: hidden layer sizes (channels for ``network = "conv"``).
        activation: activation between layers (see ``model.networks.ACTIVATIONS``).
        min_scale: floor added to the diagonal of the Cholesky factor.
        network: ``"mlp"`` or ``"conv"``.
        image_shape: ``(H, W)`` of image data, needed by ``"conv"``.
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "softplus",
        min_scale: float = 1e-4,
        network: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_min_scale(min_scale)
        size = latent_dim + latent_dim * (latent_dim + 1) // 2
        self.net = build_network(network, in_features, size, hidden, activation, image_shape)
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        self.to_cholesky = SoftplusLowerCholeskyTransform()

    def forward(self, x: Tensor) -> dist.Distribution:
        out = self.net(x)
        loc, tril = out[..., : self.latent_dim], out[..., self.latent_dim :]
        scale_tril = self.to_cholesky(vec_to_tril_matrix(tril))
        eye = torch.eye(self.latent_dim, dtype=out.dtype, device=out.device)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril + self.min_scale * eye)


class LowRankNormal(nn.Module):
    """A Gaussian q(z|x) with covariance ``W W^T + D``: rank ``rank`` plus diagonal.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        rank: rank of the factor W (at least one, at most ``latent_dim``).
        hidden: hidden layer sizes (channels for ``network = "conv"``).
        activation: activation between layers (see ``model.networks.ACTIVATIONS``).
        min_scale: floor of the diagonal standard deviations ``sqrt(D)``.
        network: ``"mlp"`` or ``"conv"``.
        image_shape: ``(H, W)`` of image data, needed by ``"conv"``.
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        rank: int = 1,
        hidden: Sequence[int] = (256, 256),
        activation: str = "softplus",
        min_scale: float = 1e-4,
        network: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_min_scale(min_scale)
        if int(rank) != rank or not 1 <= rank <= latent_dim:
            raise ValueError(f"rank must be an integer in [1, latent_dim={latent_dim}], got {rank}")
        size = latent_dim * (2 + rank)
        self.net = build_network(network, in_features, size, hidden, activation, image_shape)
        self.latent_dim = latent_dim
        self.rank = int(rank)
        self.min_scale = min_scale

    def forward(self, x: Tensor) -> dist.Distribution:
        out = self.net(x)
        loc, raw_scale, factor = out.split(
            [self.latent_dim, self.latent_dim, self.latent_dim * self.rank], dim=-1
        )
        cov_factor = factor.unflatten(-1, (self.latent_dim, self.rank))
        cov_diag = (softplus(raw_scale) + self.min_scale) ** 2
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)


def _check_min_scale(min_scale: float) -> None:
    if not min_scale > 0:
        raise ValueError(f"min_scale must be positive, got {min_scale}")


ENCODERS: dict[str, type[nn.Module]] = {
    "diagonal_normal": DiagonalNormal,
    "full_covariance_normal": FullCovarianceNormal,
    "low_rank_normal": LowRankNormal,
    "flow": FlowEncoder,
}
"""Spec name -> encoder constructor; the constructor's signature is the spec's schema."""
