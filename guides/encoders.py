"""Encoders: modules mapping x of shape ``(B, F)`` to a distribution over z, batch shape ``(B,)``.

Every encoder is one trunk and one head (zuko's pattern: NSF is MAF with another univariate
transform). The trunk, :class:`Encoder`, is the network ``network`` names
(``pyrovae.model.networks.NETWORKS``: ``"mlp"``, or ``"conv"`` for images, the same choice
decoders make), where ``hidden`` lists units per layer for an MLP and channels per stride-2
convolution for a conv network. The head turns the trunk's output into the distribution:
diagonal, full-covariance or low-rank Gaussian, or a conditional flow
(:class:`~pyrovae.guides.flows.FlowEncoder`).

The richer heads have a ``base_only`` switch: while it is on, the head gives its diagonal
Gaussian base (the same loc and scales, no correlations, no flow), which is how a guide
warm-up (``pyrovae.inference.GuideWarmup``, ``train.guide_warmup``) trains a richer guide as
the diagonal one for its first epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import SoftplusLowerCholeskyTransform
from torch import Tensor, nn
from torch.distributions.utils import vec_to_tril_matrix
from torch.nn.functional import softplus

from pyrovae.model.distributions import FullRankNormal
from pyrovae.model.networks import network as build_network


class Encoder(nn.Module):
    """An encoder: the shared trunk, a network from x to ``head.in_features`` numbers, and
    a head that turns them into q(z|x). ``in_features`` and ``head`` are positional: a
    subclass passes them, and its own signature with the trunk's keywords is the spec's
    schema.

    Args:
        in_features: number of data features F.
        head: a module with an ``in_features`` attribute, mapping that many numbers to a
            distribution over z.
        hidden: hidden layer sizes: units per layer for ``"mlp"`` (default 256, 256),
            channels per stride-2 layer for ``"conv"`` (default: see
            ``pyrovae.model.networks``); None for the network's default.
        activation: activation between layers (see ``pyrovae.model.networks.ACTIVATIONS``).
        network: ``"mlp"`` or ``"conv"``.
        image_shape: ``(C, H, W)`` (or ``(H, W)``) of image data, needed by ``"conv"``.
    """

    def __init__(
        self,
        in_features: int,
        head: nn.Module,
        /,
        hidden: Sequence[int] | None = None,
        activation: str = "softplus",
        network: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.net = build_network(
            network, in_features, head.in_features, hidden, activation, image_shape
        )
        self.head = head

    def forward(self, x: Tensor) -> dist.Distribution:
        return self.head(self.net(x))


class DiagonalNormalHead(nn.Module):
    """``Normal(loc, softplus(raw) + min_scale).to_event(1)`` from ``2 * latent_dim`` numbers."""

    def __init__(self, latent_dim: int, min_scale: float = 1e-4) -> None:
        super().__init__()
        _check_min_scale(min_scale)
        self.in_features = 2 * latent_dim
        self.min_scale = min_scale

    def forward(self, params: Tensor) -> dist.Distribution:
        loc, raw_scale = params.chunk(2, dim=-1)
        return dist.Normal(loc, softplus(raw_scale) + self.min_scale).to_event(1)


class FullCovarianceHead(nn.Module):
    """A ``MultivariateNormal`` (:class:`~pyrovae.model.distributions.FullRankNormal`) from loc and the ``D (D + 1) / 2`` entries of a lower
    triangle: the diagonal goes through ``softplus(.) + min_scale``, the off-diagonal entries
    are the outputs times ``off_diagonal_scale``.

    The factor keeps q near the diagonal Gaussian at the start and slows the off-diagonal
    entries' learning by the same factor: with a single-sample ELBO their gradients are
    mostly noise, and Adam, which steps every weight by about the learning rate whatever its
    gradient's size, would otherwise let D (D - 1) / 2 noisy correlations wander.

    With ``base_only`` set, q is the diagonal Gaussian of the same loc and diagonal entries
    (the factor's diagonal is exactly the diagonal guide's scale).
    """

    def __init__(
        self, latent_dim: int, min_scale: float = 1e-4, off_diagonal_scale: float = 0.01
    ) -> None:
        super().__init__()
        _check_min_scale(min_scale)
        if not off_diagonal_scale > 0:
            raise ValueError(f"off_diagonal_scale must be positive, got {off_diagonal_scale}")
        self.in_features = latent_dim + latent_dim * (latent_dim + 1) // 2
        self.latent_dim = latent_dim
        self.min_scale = min_scale
        self.to_cholesky = SoftplusLowerCholeskyTransform()
        rows, cols = torch.tril_indices(latent_dim, latent_dim)
        factor = torch.where(rows == cols, 1.0, off_diagonal_scale)
        self.register_buffer("factor", factor, persistent=False)
        # Where the diagonal entries sit in the packed lower triangle (row-major).
        self.register_buffer("diagonal", (rows == cols).nonzero().squeeze(-1), persistent=False)
        self.base_only = False

    def forward(self, params: Tensor) -> dist.Distribution:
        loc, tril = params[..., : self.latent_dim], params[..., self.latent_dim :]
        if self.base_only:
            scale = softplus(tril[..., self.diagonal]) + self.min_scale
            return dist.Normal(loc, scale).to_event(1)
        scale_tril = self.to_cholesky(vec_to_tril_matrix(tril * self.factor.to(tril)))
        eye = torch.eye(self.latent_dim, dtype=params.dtype, device=params.device)
        return FullRankNormal(loc, scale_tril=scale_tril + self.min_scale * eye)


class LowRankHead(nn.Module):
    """A ``LowRankMultivariateNormal`` with covariance ``W W^T + D`` of rank ``rank``; W is the
    outputs times ``factor_scale``, small for the reason :class:`FullCovarianceHead` gives
    (and not zero: W's gradient vanishes at W = 0). With ``base_only`` set, q is the diagonal
    Gaussian ``N(loc, D)``."""

    def __init__(
        self, latent_dim: int, rank: int = 1, min_scale: float = 1e-4, factor_scale: float = 0.01
    ) -> None:
        super().__init__()
        _check_min_scale(min_scale)
        if int(rank) != rank or not 1 <= rank <= latent_dim:
            raise ValueError(f"rank must be an integer in [1, latent_dim={latent_dim}], got {rank}")
        if not factor_scale > 0:
            raise ValueError(f"factor_scale must be positive, got {factor_scale}")
        self.in_features = latent_dim * (2 + int(rank))
        self.latent_dim = latent_dim
        self.rank = int(rank)
        self.min_scale = min_scale
        self.factor_scale = factor_scale
        self.base_only = False

    def forward(self, params: Tensor) -> dist.Distribution:
        loc, raw_scale, factor = params.split(
            [self.latent_dim, self.latent_dim, self.latent_dim * self.rank], dim=-1
        )
        if self.base_only:
            return dist.Normal(loc, softplus(raw_scale) + self.min_scale).to_event(1)
        cov_factor = self.factor_scale * factor.unflatten(-1, (self.latent_dim, self.rank))
        cov_diag = (softplus(raw_scale) + self.min_scale) ** 2
        return dist.LowRankMultivariateNormal(loc, cov_factor, cov_diag)


class DiagonalNormal(Encoder):
    """A Gaussian q(z|x) with diagonal covariance.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        min_scale: floor added to the softplus scale, for numerical safety.
        **trunk: options of the trunk (:class:`Encoder`): ``hidden``, ``activation``,
            ``network``, ``image_shape``.

    References:
        Auto-Encoding Variational Bayes (Kingma and Welling, 2014)
    """

    def __init__(
        self, in_features: int, latent_dim: int, *, min_scale: float = 1e-4, **trunk: Any
    ) -> None:
        super().__init__(in_features, DiagonalNormalHead(latent_dim, min_scale), **trunk)


class FullCovarianceNormal(Encoder):
    """A Gaussian q(z|x) with full covariance, parameterised by its Cholesky factor.

    The trunk emits loc and the ``D (D + 1) / 2`` entries of the factor's lower triangle
    (:class:`FullCovarianceHead`); it costs O(D^2) outputs per point against 2 D for
    :class:`DiagonalNormal`, and a D x D triangular solve per density.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        min_scale: floor added to the diagonal of the Cholesky factor.
        off_diagonal_scale: factor on the off-diagonal outputs (see
            :class:`FullCovarianceHead`).
        **trunk: options of the trunk (:class:`Encoder`).
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        *,
        min_scale: float = 1e-4,
        off_diagonal_scale: float = 0.01,
        **trunk: Any,
    ) -> None:
        head = FullCovarianceHead(latent_dim, min_scale, off_diagonal_scale)
        super().__init__(in_features, head, **trunk)


class LowRankNormal(Encoder):
    """A Gaussian q(z|x) with covariance ``W W^T + D``: rank ``rank`` plus diagonal.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        rank: rank of the factor W (at least one, at most ``latent_dim``).
        min_scale: floor of the diagonal standard deviations ``sqrt(D)``.
        factor_scale: factor on the outputs that make W.
        **trunk: options of the trunk (:class:`Encoder`).
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        *,
        rank: int = 1,
        min_scale: float = 1e-4,
        factor_scale: float = 0.01,
        **trunk: Any,
    ) -> None:
        super().__init__(
            in_features, LowRankHead(latent_dim, rank, min_scale, factor_scale), **trunk
        )


def _check_min_scale(min_scale: float) -> None:
    if not min_scale > 0:
        raise ValueError(f"min_scale must be positive, got {min_scale}")
