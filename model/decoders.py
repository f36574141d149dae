"""Decoders: modules mapping z of shape ``(..., latent_dim)`` to likelihood parameters.

The output has shape ``(..., out_features)`` with ``out_features = F * num_params``, laid out
parameter-major: ``output[..., j * F:(j + 1) * F]`` is the likelihood's parameter j for every
feature, which is what ``chunk(num_params, dim=-1)`` in the likelihoods reads.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from pyrovae.model import networks


class Decoder(nn.Module):
    """A feed-forward network from z to the likelihood's parameters.

    ``network`` picks it as encoders pick theirs: ``"mlp"`` (``hidden`` lists units per
    layer) or ``"conv"``, transposed convolutions shaped from the image (``hidden`` lists
    channels from the coarsest map to the finest; see ``pyrovae.model.networks.deconv``).

    Args:
        latent_dim: dimension of z.
        out_features: size of the output, the number of data features times the number of
            parameters the likelihood takes per feature.
        hidden: hidden layer sizes: units per layer for ``"mlp"`` (default 256, 256),
            channels per stride-2 layer for ``"conv"`` (default: see
            ``pyrovae.model.networks``); None for the network's default.
        activation: activation between layers (see ``pyrovae.model.networks.ACTIVATIONS``).
        network: ``"mlp"`` or ``"conv"``.
        image_shape: ``(C, H, W)`` (or ``(H, W)``) of image data, needed by ``"conv"``.
    """

    def __init__(
        self,
        latent_dim: int,
        out_features: int,
        hidden: Sequence[int] | None = None,
        activation: str = "softplus",
        network: str = "mlp",
        image_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.net = networks.network(
            network, latent_dim, out_features, hidden, activation, image_shape, generative=True
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


DECODERS: dict[str, type[nn.Module]] = {
    "feedforward": Decoder,
}
"""Spec name -> decoder constructor; the constructor's signature is the spec's schema."""
