"""Decoders: modules mapping z of shape ``(..., latent_dim)`` to likelihood parameters."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from model.networks import mlp


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
        self.net = mlp(latent_dim, out_features, hidden, activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)


DECODERS: dict[str, type[nn.Module]] = {
    "mlp": MLPDecoder,
}
"""Spec name -> decoder constructor; the constructor's signature is the spec's schema."""
