"""Small network builders shared by decoders and encoders."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """Returns a fresh activation module for ``name`` (one of :data:`ACTIVATIONS`)."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; valid: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


def mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (256, 256),
    activation_name: str = "softplus",
) -> nn.Sequential:
    """A multilayer perceptron: ``Linear`` layers with ``activation_name`` between them.

    Args:
        in_features: size of the input.
        out_features: size of the output (no activation after the last layer).
        hidden: sizes of the hidden layers; empty for a single linear map.
        activation_name: a key of :data:`ACTIVATIONS`.

    Returns:
        The network, acting on the last dimension of its input.
    """
    if any(int(h) < 1 for h in hidden):
        raise ValueError(f"hidden sizes must be positive integers, got {list(hidden)}")
    sizes = [in_features, *map(int, hidden), out_features]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(activation(activation_name))
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)
