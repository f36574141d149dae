"""Amortized flow encoders: q(z|x) as a conditional zuko flow, inverted so sampling is cheap."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro.distributions as dist
import zuko
from pyro.contrib.zuko import ZukoToPyro
from torch import Tensor, nn
from torch.nn.functional import softplus

from pyrovae.guides.encoders import Encoder
from pyrovae.model.flows import autoregressive_flow, inverse_flow


class ContextDiagNormal(zuko.lazy.LazyDistribution):
    """A lazy diagonal Gaussian read off its context: loc is ``c[..., :D]`` and the scale
    ``softplus(c[..., D:2D]) + min_scale``, exactly as a diagonal guide's head makes them.

    Args:
        features: dimension D of the variable.
        min_scale: floor added to the softplus scale.
    """

    def __init__(self, features: int, min_scale: float = 1e-4) -> None:
        super().__init__()
        self.features = features
        self.min_scale = min_scale

    def forward(self, c: Tensor | None = None) -> zuko.distributions.DiagNormal:
        loc, raw_scale = c[..., : self.features], c[..., self.features : 2 * self.features]
        return zuko.distributions.DiagNormal(loc, softplus(raw_scale) + self.min_scale)


class FlowHead(nn.Module):
    """The head of a flow encoder: ``ZukoToPyro(flow(h))`` for a conditional zuko flow; with
    ``base_only`` set, the flow's base distribution alone, ``ZukoToPyro(flow.base(h))``.

    Args:
        flow: a zuko flow conditioned on a context of ``context_features`` numbers.
        context_features: the size of the context, the trunk's output.
    """

    def __init__(self, flow: zuko.flows.Flow, context_features: int) -> None:
        super().__init__()
        self.flow = flow
        self.in_features = context_features
        self.base_only = False

    def forward(self, context: Tensor) -> dist.Distribution:
        if self.base_only:
            return ZukoToPyro(self.flow.base(context).expand(context.shape[:-1]))
        return ZukoToPyro(self.flow(context))


class FlowEncoder(Encoder):
    """An amortized normalizing-flow guide (Kingma et al.'s IAF): the trunk maps x to a loc, a
    scale and a context vector h; ``z0 ~ N(loc, diag(scale^2))``, exactly the diagonal guide,
    and z is z0 pushed through ``transforms`` autoregressive transforms conditioned on
    ``(loc, scale, h)``, each an inverted zuko MAF (affine: an IAF) or NSF (splines)
    transform that starts near the identity, so that the guide starts as the diagonal one. A
    sample and its log-density take one pass (``rsample_and_log_prob``, cached by
    ``ZukoToPyro`` for the ELBO).

    Scoring points not drawn from this guide (a VampPrior mixture, ``log_prob`` of another z)
    is the flow's sequential direction: ``latent_dim`` passes per transform, or ``passes``.
    The distribution has batch shape ``(B,)``; Pyro's vectorized particles expand it to
    ``(P, B)``, which draws P samples per data point against the same context.

    Args:
        in_features: number of data features F.
        latent_dim: dimension of z.
        flow: ``"maf"`` (affine, giving an IAF) or ``"nsf"`` (rational-quadratic splines).
        transforms: number of autoregressive transforms (at least one).
        flow_hidden: hidden layer sizes of each transform's masked MLP.
        context_features: size of the context vector h beside loc and scale.
        passes: passes of the density direction per transform, None for ``latent_dim``
            (fully autoregressive, Kingma et al.'s IAF); 2 makes each transform a coupling
            layer, whose density of other points is also cheap: what a VampPrior over this
            guide needs, as it scores every sample under every pseudo-input's posterior.
        min_scale: floor added to the base distribution's softplus scale.
        **trunk: options of the trunk (:class:`~pyrovae.guides.encoders.Encoder`) from x to h.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016);
        Neural Spline Flows (Durkan et al., 2019)
    """

    def __init__(
        self,
        in_features: int,
        latent_dim: int,
        *,
        flow: str = "maf",
        transforms: int = 3,
        flow_hidden: Sequence[int] = (64, 64),
        context_features: int = 32,
        passes: int | None = None,
        min_scale: float = 1e-4,
        **trunk: Any,
    ) -> None:
        if int(context_features) != context_features or context_features < 1:
            raise ValueError(f"context_features must be a positive integer, got {context_features}")
        if not min_scale > 0:
            raise ValueError(f"min_scale must be positive, got {min_scale}")
        context = 2 * latent_dim + int(context_features)
        base = ContextDiagNormal(latent_dim, min_scale)
        conditional = autoregressive_flow(
            flow, latent_dim, context, transforms, flow_hidden, base, passes
        )
        super().__init__(in_features, FlowHead(inverse_flow(conditional), context), **trunk)
