"""Builders of zuko normalizing flows, shared by the flow prior and the flow guide."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import zuko
from torch import nn

from pyrovae.model.networks import check_sizes

FLOWS: dict[str, type[zuko.flows.Flow]] = {
    "maf": zuko.flows.MAF,
    "nsf": zuko.flows.NSF,
}
"""Flow name -> zuko autoregressive flow: affine (MAF) or rational-quadratic spline (NSF)."""


def autoregressive_flow(
    kind: str,
    features: int,
    context: int = 0,
    transforms: int = 3,
    hidden: Sequence[int] = (64, 64),
    base: nn.Module | None = None,
    passes: int | None = None,
) -> zuko.flows.Flow:
    """A zuko autoregressive flow over ``features`` dimensions, optionally conditional.

    Consecutive transforms alternate the autoregressive order. NSF splines act on [-5, 5]
    and are the identity outside it. A transform is one pass of its masked network in its
    cheap direction and ``passes`` sequential passes in the other: ``None`` (fully
    autoregressive, the most expressive) is ``features`` passes; ``2`` makes each transform a
    coupling layer (RealNVP's: one half of the features, alternating, conditions the
    other), cheap both ways. Every transform starts as the identity
    (:func:`start_at_identity`), so a new flow is its base distribution.

    Args:
        kind: a key of :data:`FLOWS`.
        features: dimension of the variable.
        context: size of the conditioning vector, 0 for none.
        transforms: number of autoregressive transforms (at least one).
        hidden: hidden layer sizes of each transform's masked MLP.
        base: a lazy base distribution ``base(c)`` replacing the flow's standard normal.
        passes: sequential passes of the expensive direction, from 2 to ``features``, or
            None for ``features``.

    Returns:
        The flow: ``flow(c)`` is a ``zuko.distributions.NormalizingFlow``.

    References:
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017);
        Neural Spline Flows (Durkan et al., 2019)
    """
    if kind not in FLOWS:
        raise ValueError(f"unknown flow {kind!r}; valid: {', '.join(FLOWS)}")
    if not _is_integer(transforms) or transforms < 1:
        raise ValueError(f"transforms must be a positive integer, got {transforms!r}")
    if passes is not None and (not _is_integer(passes) or not 2 <= passes <= max(features, 2)):
        raise ValueError(
            f"passes must be an integer from 2 to the latent dimension {features}, or left "
            f"out for a fully autoregressive flow; got {passes!r}"
        )
    flow = FLOWS[kind](
        features,
        context,
        transforms=int(transforms),
        hidden_features=check_sizes(hidden, "flow hidden sizes"),
        passes=None if passes is None else int(passes),
    )
    if base is not None:
        flow.base = base
    start_at_identity(flow)
    return flow


def _is_integer(value: object) -> bool:
    """A whole number (an int, or a float such as 2.0), not a bool or a string."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and float(value).is_integer()
    )


def start_at_identity(flow: zuko.flows.Flow, scale: float = 0.01) -> None:
    """Shrinks the last layer of every autoregressive transform's network by ``scale``, so
    that each transform starts within about ``scale`` of the identity (MAF: shift 0 and
    scale 1; NSF: equal bins with unit slopes) and the flow near its base distribution.

    Small rather than zero: at exactly zero the layers before the last get no gradient.
    The flow moves away from the identity only as far as that helps (Glow zero-initialises
    its couplings' last layers for the same reason).

    References:
        Glow: Generative Flow with Invertible 1x1 Convolutions (Kingma and Dhariwal, 2018)
    """
    for module in flow.transform.modules():
        hyper = getattr(module, "hyper", None)
        if isinstance(hyper, nn.Sequential):
            last = hyper[-1]
            with torch.no_grad():
                last.weight.mul_(scale)
                last.bias.mul_(scale)


def inverse_flow(flow: zuko.flows.Flow) -> zuko.flows.Flow:
    """The flow with its transform inverted, so that sampling is the cheap direction.

    A MAF evaluates densities in one pass and samples in ``features`` sequential passes;
    inverted, it is an inverse autoregressive flow (IAF): one pass to sample, and
    ``rsample_and_log_prob`` gives the density of its own samples in that same pass. The
    density of other points becomes the sequential direction (``passes`` of
    :func:`autoregressive_flow` sets how many passes it takes). This is zuko's pattern for
    flows trained by reverse KL.

    References:
        Improved Variational Inference with Inverse Autoregressive Flow (Kingma et al., 2016)
    """
    return zuko.flows.Flow(flow.transform.inv, flow.base)
