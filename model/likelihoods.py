"""Likelihoods p(x|z): modules mapping decoder output to a distribution over x.

A likelihood's ``forward(params)`` takes the decoder output of shape ``(..., F * num_params)``
and returns a distribution with event shape ``(F,)``, where F is the number of data features.
``num_params`` (default 1 when absent) tells the builder how wide the decoder must be.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor, nn


class Bernoulli(nn.Module):
    """Independent Bernoulli pixels parameterised by logits: the binary cross-entropy loss.

    ``-log p(x|z)`` is exactly ``binary_cross_entropy_with_logits(logits, x, reduction="sum")``.
    Data must lie in [0, 1]; for grey levels that are not 0 or 1 the value is still the
    cross-entropy, but no longer a normalised density (use dynamic binarization for that).
    """

    num_params = 1

    def forward(self, logits: Tensor) -> dist.Distribution:
        # Grey-level targets in [0, 1] are allowed (cross-entropy); the data are checked once
        # up front, so per-step support checks are switched off here.
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


class Gaussian(nn.Module):
    """Independent Gaussian pixels with mean given by the decoder.

    With a fixed ``scale`` s, ``-log p(x|z) = ||x - mean||^2 / (2 s^2) + F log(s sqrt(2 pi))``:
    the sum-of-squares (MSE) loss scaled by ``1 / (2 s^2)`` plus a constant. A smaller scale
    weights reconstruction more heavily against the KL term (like beta < 1); a larger one
    pushes towards the prior and blurrier reconstructions. ``learn_scale=True`` learns one
    global scale by maximum likelihood instead.

    Args:
        scale: the standard deviation, or its initial value when learned.
        learn_scale: learn a single global log-scale.
    """

    num_params = 1

    def __init__(self, scale: float = 1.0, learn_scale: bool = False) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self, loc: Tensor) -> dist.Distribution:
        return dist.Normal(loc, self.log_scale.exp().expand_as(loc)).to_event(1)


LIKELIHOODS: dict[str, type[nn.Module]] = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
}
"""Spec name -> likelihood constructor; the constructor's signature is the spec's schema."""
