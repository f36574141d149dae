"""Decoders: modules mapping z of shape ``(..., latent_dim)`` to likelihood parameters.

The output has shape ``(..., out_features)`` with ``out_features = F * num_params``, laid out
parameter-major: ``output[..., j * F:(j + 1) * F]`` is the likelihood's parameter j for every
feature, which is what ``chunk(num_params, dim=-1)`` in the likelihoods reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from pyrovae.model import networks
from torch import Tensor, nn


class MLPDecoder(nn.Module):
    """A multilayer perceptron from z to the likelihood's parameters.

    Args:
        latent_dim: dimension of z.
        out_features: size of the output, the number of data features times the number of
            parameters the likelihood takes per feature.
        hidden: hidden layer sizes.
        activation: activation between layers (see ``model.networks.ACTIVATIONS``).
    """

    def __init__(
        self,
        latent_dim: int,
        out_features: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "softplus",
    ) -> None:
        super().__init__()
        self.net = networks.mlp(latent_dim, out_features, hidden, activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


class ConvDecoder(nn.Module):
    """A transposed-convolution decoder from z to per-pixel likelihood parameters.

    A ``Linear`` layer maps z to ``hidden[0]`` feature maps of side ``ceil(H / 2**n)`` (n =
    ``len(hidden)``); each following transposed convolution (kernel 4, stride 2, padding 1)
    doubles the side exactly, the last one emitting ``out_features // (H * W)`` channels, one
    per likelihood parameter; the result is cropped to ``(H, W)`` and flattened
    channel-major. Leading dimensions of z (particles, batch) are flattened and restored.

    Args:
        latent_dim: dimension of z.
        out_features: ``H * W * num_params``.
        image_shape: ``(H, W)``; required.
        hidden: channels of the feature maps from the coarsest to the finest (at least one).
        activation: activation between layers (see ``model.networks.ACTIVATIONS``).

    References:
        Unsupervised Representation Learning with Deep Convolutional Generative Adversarial
        Networks (Radford et al., 2016)
    """

    def __init__(
        self,
        latent_dim: int,
        out_features: int,
        image_shape: Sequence[int] | None = None,
        hidden: Sequence[int] = (64, 32),
        activation: str = "relu",
    ) -> None:
        super().__init__()
        channels = networks.check_sizes(hidden, "conv channels")
        if not channels:
            raise ValueError("a conv decoder needs at least one channel size in hidden")
        self.height, self.width = networks.image_size(image_shape)
        pixels = self.height * self.width
        if out_features % pixels:
            raise ValueError(f"out_features {out_features} is not a multiple of {pixels} pixels")
        # Each transposed convolution doubles the side, so start at ceil(side / 2**n) and crop.
        scale = 2 ** len(channels)
        side = (-(-self.height // scale), -(-self.width // scale))
        layers: list[nn.Module] = [
            nn.Linear(latent_dim, channels[0] * side[0] * side[1]),
            networks.activation(activation),
            nn.Unflatten(-1, (channels[0], *side)),
        ]
        for c_in, c_out in pairwise([*channels, out_features // pixels]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                networks.activation(activation),
            ]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, z: Tensor) -> Tensor:
        maps = self.net(z.reshape(-1, z.shape[-1]))[..., : self.height, : self.width]
        return maps.reshape(*z.shape[:-1], -1)


DECODERS: dict[str, type[nn.Module]] = {
    "mlp": MLPDecoder,
    "conv": ConvDecoder,
}
"""Spec name -> decoder constructor; the constructor's signature is the spec's schema."""
