"""Probabilistic PCA, the linear-Gaussian VAE with closed forms, shared by the oracle tests.

z ~ N(0, prior_var I), x|z ~ N(W z + b, noise² I) has log p(x) = log N(x; b, prior_var W Wᵀ +
noise² I) and a Gaussian posterior, so an exact guide makes every log weight equal log p(x).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor, nn


def gaussian_posterior(
    decoder: nn.Linear, noise: float, prior_var: float, x: Tensor
) -> tuple[Tensor, Tensor]:
    """Posterior of z ~ N(0, prior_var I), x|z ~ N(decoder(z), noise² I): loc and scale_tril."""
    weight, bias = decoder.weight, decoder.bias
    eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
    cov = torch.linalg.inv(eye / prior_var + weight.T @ weight / noise**2)
    loc = (x - bias) @ weight @ cov.T / noise**2
    return loc, torch.linalg.cholesky(cov).expand(len(x), *cov.shape)


def ppca_log_px(decoder: nn.Linear, noise: float, x: Tensor, prior_var: float = 1.0) -> Tensor:
    """The closed-form log p(x) per row of ``x``."""
    weight, bias = decoder.weight, decoder.bias
    eye = torch.eye(weight.shape[0], dtype=x.dtype, device=x.device)
    return dist.MultivariateNormal(bias, prior_var * weight @ weight.T + noise**2 * eye).log_prob(x)


class PPCAPosterior(nn.Module):
    """q(z|x) for probabilistic PCA: the exact posterior, optionally shifted and widened."""

    def __init__(self, decoder: nn.Linear, noise: float, shift: float = 0.0, widen: float = 1.0):
        super().__init__()
        self.decoder, self.noise, self.shift, self.widen = decoder, noise, shift, widen

    def forward(self, x: Tensor) -> dist.Distribution:
        loc, scale_tril = gaussian_posterior(self.decoder, self.noise, 1.0, x)
        return dist.MultivariateNormal(loc + self.shift, scale_tril=self.widen * scale_tril)
