"""Amortized flow encoders: q(z|x) as a conditional zuko flow, inverted so sampling is cheap."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import zuko
from pyro.contrib.zuko import ZukoToPyro
from pyrovae.model.flows import autoregressive_flow, inverse_flow
from pyrovae.model.networks import network as build_network
from torch import Tensor, nn
from torch.nn.functional import softplus


class ConditionalDiagNormal(zuko.lazy.LazyDistribution):
    """A lazy diagonal Gaussian whose loc and scale are a linear function of the context.

    Args:
        context: size of the context vector.
        features: dimension of the variable.
        min_scale: floor added to the softplus scale.
    """

    def __init__(self, context: int, features: int, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.linear = nn.Linear(context, 2 * features)
        self.min_scale = min_scale

    def forward(self, c: Tensor | None = None) -> zuko.distributions.DiagNormal:
        loc, raw_scale = self.linear(c).chunk(2, dim=-1)
        return zuko.distributions.DiagNormal(loc, softplus(raw_scale) + self.min_scale)


class FlowEncoder(nn.Module):
    """An amortized normalizing-flow guide: a Gaussian base and inverse autoregressive steps.

    A network maps x to a context vector h. Given h, ``z0 ~ N(loc(h), diag(scale(h)^2))``
    and z is z0 pushed through ``transforms`` autoregressive transforms conditioned on h,
    each an inverted zuko MAF (affine: an IAF) or NSF (splines) transform, so that a sample
    and its log-density take one pass (``rsample_and_log_prob``, cached by ``ZukoToPyro``
    for the ELBO). Scoring other points, e.g. in a VampPrior mixture or in
    ``log_prob`` of a z not drawn from this guide, is the sequential direction.

    The distribution has batch shape ``(B,)``; Pyro's vectorized particles expand it to
    ``(P, B)``, which draws P samples per data point against the same context.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        flow: ``"maf"`` (affine, giving an IAF) or ``"nsf"`` (rational-quadratic splines).
        transforms: number of autoregressive transforms (at least one).
        hidden: hidden layer sizes of the network from x to h (channels for ``"conv"``).
        flow_hidden: hidden layer sizes of each transform's masked MLP.
        context_features: size of the context vector h.
        activation: activation of the network from x to h.
        min_scale: floor added to the base distribution's softplus scale.
        network: ``"mlp"`` or ``"conv"``.
        image_shape: ``(H, W)`` of image data, needed by ``"conv"``.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016);
        Neural Spline Flows (Durkan et al., 2019)
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        flow: str = "maf",
        transforms: int = 3,
        hidden: Sequence[int] = (256, 256),
        flow_hidden: Sequence[int] = (64, 64),
        context_features: int = 32,
        activation: str = "softplus",
        min_scale: float = 1e-4,
        network: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if int(context_features) != context_features or context_features < 1:
            raise ValueError(f"context_features must be a positive integer, got {context_features}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        self.net = build_network(
            network, in_features, context_features, hidden, activation, image_shape
        )
        base = ConditionalDiagNormal(context_features, latent_dim, min_scale)
        self.flow = inverse_flow(
            autoregressive_flow(flow, latent_dim, context_features, transforms, flow_hidden, base)
        )

    def forward(self, x: Tensor) -> dist.Distribution:
        return ZukoToPyro(self.flow(self.net(x)))
