"""Priors p(z): modules whose ``forward()`` returns a distribution with event shape ``(latent_dim,)``."""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.contrib.zuko import ZukoToPyro
from torch import nn

from model.flows import autoregressive_flow


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
        _check_latent_dim(latent_dim)
        # Buffers follow the module across devices and dtypes.
        self.register_buffer("loc", torch.zeros(latent_dim))
        self.register_buffer("scale", torch.ones(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedNormal(nn.Module):
    """A diagonal Gaussian prior N(loc, diag(scale^2)) with learned loc and scale.

    Starts as N(0, I). With a Gaussian guide and decoder it adds nothing a reparametrisation
    of z could not absorb, but it lets unused dimensions shrink or shift freely.

    Args:
        latent_dim: dimension of z.
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        self.loc = nn.Parameter(torch.zeros(latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


class MixtureOfNormals(nn.Module):
    """A learned mixture of ``components`` diagonal Gaussians.

    Means start at standard normal draws, scales at one and weights uniform.

    Args:
        latent_dim: dimension of z.
        components: number of mixture components K (at least one).

    References:
        Deep Unsupervised Clustering with Gaussian Mixture Variational Autoencoders
        (Dilokthanakul et al., 2016)
    """

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        _check_components(components)
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(torch.randn(components, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(components, latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits),
            dist.Normal(self.loc, self.log_scale.exp()).to_event(1),
        )


class VampPrior(nn.Module):
    """The VampPrior: the guide's encoder applied to K learned pseudo-inputs, mixed equally.

    ``p(z) = (1 / K) sum_k q(z | u_k)`` with pseudo-inputs ``u_k`` of shape
    ``(in_features,)``, initialised uniformly on [0, 1] (where image data live). The encoder
    is the guide's own module, shared: it is a submodule of both model and guide, so collect
    parameters with ``objective(model, guide).parameters()`` or
    ``nn.ModuleList([model, guide]).parameters()``, which list it once.

    The encoder's output for the K pseudo-inputs must serve as ``MixtureSameFamily``'s
    component distribution (batch shape ``(K,)``, a ``log_prob`` that broadcasts, and
    ``sample``): the Gaussian encoders do; flow encoders (wrapped by ``ZukoToPyro``) do not
    sample that way, and are rejected when the prior is built.

    Args:
        latent_dim: dimension of z.
        in_features: number of data features F.
        encoder: the guide's encoder, ``encoder(x) -> Distribution`` over z.
        components: number of pseudo-inputs K (at least one).

    References:
        VAE with a VampPrior (Tomczak and Welling, 2018)
    """

    def __init__(
        self,
        latent_dim: int,
        in_features: int,
        encoder: nn.Module | None = None,
        components: int = 50,
    ) -> None:
        super().__init__()
        if encoder is None:
            raise ValueError("the VampPrior needs the guide's encoder (encoder is None)")
        _check_latent_dim(latent_dim)
        _check_components(components)
        self.encoder = encoder
        self.pseudo_inputs = nn.Parameter(torch.rand(components, in_features))
        self.register_buffer("logits", torch.zeros(components))
        with torch.no_grad():
            self._check_mixture(latent_dim)

    def forward(self) -> dist.Distribution:
        return dist.MixtureSameFamily(
            dist.Categorical(logits=self.logits), self.encoder(self.pseudo_inputs)
        )

    def _check_mixture(self, latent_dim: int) -> None:
        components = self.encoder(self.pseudo_inputs)
        shape = (tuple(components.batch_shape), tuple(components.event_shape))
        if shape != ((len(self.logits),), (latent_dim,)):
            raise ValueError(
                f"the VampPrior needs an encoder with batch shape (K,) and event shape "
                f"({latent_dim},) for K pseudo-inputs; got {shape}"
            )
        try:
            mixture = self()
            mixture.log_prob(mixture.sample((2,)))
        except (NotImplementedError, RuntimeError, TypeError, ValueError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else "not implemented"
            raise ValueError(
                f"the VampPrior cannot mix {type(components).__name__} components, which "
                f"MixtureSameFamily must sample and score as a batch ({type(e).__name__}: "
                f"{detail}); use a Gaussian encoder"
            ) from None


class FlowPrior(nn.Module):
    """A normalizing-flow prior: a zuko MAF or NSF over z with a standard normal base.

    Sampling a MAF prior takes ``latent_dim`` sequential passes and scoring one pass; in a
    VAE the prior only scores the guide's samples during training, so this is the cheap
    direction where it matters.

    Args:
        latent_dim: dimension of z.
        flow: ``"maf"`` (affine) or ``"nsf"`` (rational-quadratic splines).
        transforms: number of autoregressive transforms (at least one).
        hidden: hidden layer sizes of each transform's masked MLP.

    References:
        Variational Lossy Autoencoder (Chen et al., 2017);
        Masked Autoregressive Flow for Density Estimation (Papamakarios et al., 2017)
    """

    def __init__(
        self,
        latent_dim: int,
        flow: str = "maf",
        transforms: int = 3,
        hidden: Sequence[int] = (64, 64),
    ) -> None:
        super().__init__()
        _check_latent_dim(latent_dim)
        self.flow = autoregressive_flow(flow, latent_dim, 0, transforms, hidden)

    def forward(self) -> dist.Distribution:
        return ZukoToPyro(self.flow())


def _check_latent_dim(latent_dim: int) -> None:
    if int(latent_dim) != latent_dim or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")


def _check_components(components: int) -> None:
    if int(components) != components or components < 1:
        raise ValueError(f"components must be a positive integer, got {components}")


PRIORS: dict[str, type[nn.Module]] = {
    "standard_normal": StandardNormal,
    "learned_normal": LearnedNormal,
    "mixture": MixtureOfNormals,
    "vamp": VampPrior,
    "flow": FlowPrior,
}
"""Spec name -> prior constructor; the constructor's signature is the spec's schema."""
