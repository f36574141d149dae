"""Small network builders shared by decoders and encoders.

:data:`NETWORKS` maps a name to a builder with one signature,
``(in_features, out_features, hidden, activation, image_shape)``, that returns a module from
``(..., in_features)`` to ``(..., out_features)`` for images or vectors coming in;
:data:`GENERATIVE_NETWORKS` does the same for images going out. Encoders and decoders both
pick theirs with a ``network`` option: ``"mlp"``, ``"gated_mlp"`` (Tomczak and Welling's gated
dense layers) or ``"conv"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
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
    image_shape: Sequence[int] | None = None,
) -> nn.Sequential:
    """A multilayer perceptron: ``Linear`` layers with ``activation_name`` between them.

    Args:
        in_features: size of the input.
        out_features: size of the output (no activation after the last layer).
        hidden: sizes of the hidden layers; empty for a single linear map.
        activation_name: a key of :data:`ACTIVATIONS`.
        image_shape: unused; accepted so that every entry of :data:`NETWORKS` shares one
            signature.

    Returns:
        The network, acting on the last dimension of its input.
    """
    sizes = [in_features, *check_sizes(hidden, "hidden sizes"), out_features]
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(pairwise(sizes)):
        if i:
            layers.append(activation(activation_name))
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class GatedDense(nn.Module):
    """A gated dense layer, ``activation(W x + b) * sigmoid(V x + c)``: a learned sigmoid gate
    on every unit.

    Args:
        in_features: size of the input.
        out_features: size of the output.
        activation_name: a key of :data:`ACTIVATIONS` for the gated values (``"identity"`` in
            the VampPrior paper).

    Example:
        >>> layer = GatedDense(784, 300, "identity")
        >>> layer(torch.zeros(5, 784)).shape
        torch.Size([5, 300])

    References:
        Language Modeling with Gated Convolutional Networks (Dauphin et al., 2017);
        VAE with a VampPrior (Tomczak and Welling, 2018), section 5
    """

    def __init__(self, in_features: int, out_features: int, activation_name: str) -> None:
        super().__init__()
        self.value = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(in_features, out_features)
        self.activation = activation(activation_name)

    def forward(self, x: Tensor) -> Tensor:
        return self.activation(self.value(x)) * torch.sigmoid(self.gate(x))


def gated_mlp(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (300, 300),
    activation_name: str = "identity",
    image_shape: Sequence[int] | None = None,
) -> nn.Sequential:
    """A multilayer perceptron of :class:`GatedDense` hidden layers and a final ``Linear``
    layer: the VampPrior paper's networks (two gated layers of 300 units, no activation
    besides the gates).

    Args:
        in_features: size of the input.
        out_features: size of the output (a plain linear map, no gate).
        hidden: sizes of the gated hidden layers; empty for a single linear map.
        activation_name: a key of :data:`ACTIVATIONS`, applied to the gated values.
        image_shape: unused; accepted so that every entry of :data:`NETWORKS` shares one
            signature.

    Returns:
        The network, acting on the last dimension of its input.

    References:
        VAE with a VampPrior (Tomczak and Welling, 2018), section 5
    """
    sizes = [in_features, *check_sizes(hidden, "hidden sizes")]
    layers: list[nn.Module] = [
        GatedDense(n_in, n_out, activation_name) for n_in, n_out in pairwise(sizes)
    ]
    layers.append(nn.Linear(sizes[-1], out_features))
    return nn.Sequential(*layers)


def conv(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (32, 64),
    activation_name: str = "relu",
    image_shape: Sequence[int] | None = None,
) -> nn.Sequential:
    """A convolutional network from flattened images, of any number of channels, to a vector.

    Each entry of ``hidden`` is a 3x3 convolution with stride 2 and padding 1, which maps a
    side of n pixels to ceil(n / 2) for any n; a ``Linear`` layer then maps the flattened
    feature maps to ``out_features``.

    Args:
        in_features: number of values per image, ``C * H * W``.
        out_features: size of the output.
        hidden: channels of the convolutions, one stride-2 layer each (at least one).
        activation_name: a key of :data:`ACTIVATIONS`.
        image_shape: ``(C, H, W)``, or ``(H, W)`` for one channel; required.

    Returns:
        The network, from ``(B, C * H * W)`` (channel-major, as ``Tensor.flatten`` lays out
        ``(B, C, H, W)``) to ``(B, out_features)``.
    """
    colours, height, width = image_layout(image_shape, in_features)
    channels = [colours, *check_sizes(hidden, "conv channels")]
    if len(channels) < 2:
        raise ValueError("a conv network needs at least one channel size in hidden")
    layers: list[nn.Module] = [nn.Unflatten(-1, (colours, height, width))]
    for c_in, c_out in pairwise(channels):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), activation(activation_name)]
        height, width = (height + 1) // 2, (width + 1) // 2
    layers += [nn.Flatten(-3), nn.Linear(channels[-1] * height * width, out_features)]
    return nn.Sequential(*layers)


class _TransposedConv(nn.Module):
    """Transposed convolutions from a vector to per-pixel outputs; see :func:`deconv`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden: Sequence[int],
        activation_name: str,
        image_shape: Sequence[int] | None,
    ) -> None:
        super().__init__()
        channels = check_sizes(hidden, "conv channels")
        if not channels:
            raise ValueError("a conv network needs at least one channel size in hidden")
        colours, self.height, self.width = image_layout(image_shape)
        pixels = self.height * self.width
        if out_features % (colours * pixels):
            raise ValueError(
                f"out_features {out_features} is not a multiple of {colours * pixels} values "
                f"per image ({colours} x {self.height} x {self.width})"
            )
        # Each transposed convolution doubles the side, so start at ceil(side / 2**n) and crop.
        scale = 2 ** len(channels)
        side = (-(-self.height // scale), -(-self.width // scale))
        layers: list[nn.Module] = [
            nn.Linear(in_features, channels[0] * side[0] * side[1]),
            activation(activation_name),
            nn.Unflatten(-1, (channels[0], *side)),
        ]
        for c_in, c_out in pairwise([*channels, out_features // pixels]):
            layers += [
                nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1),
                activation(activation_name),
            ]
        self.net = nn.Sequential(*layers[:-1])

    def forward(self, z: Tensor) -> Tensor:
        maps = self.net(z.reshape(-1, z.shape[-1]))[..., : self.height, : self.width]
        return maps.reshape(*z.shape[:-1], -1)


def deconv(
    in_features: int,
    out_features: int,
    hidden: Sequence[int] = (64, 32),
    activation_name: str = "relu",
    image_shape: Sequence[int] | None = None,
) -> nn.Module:
    """A transposed-convolution network from a vector to per-pixel outputs.

    A ``Linear`` layer maps the input to ``hidden[0]`` feature maps of side
    ``ceil(H / 2**n)`` (n = ``len(hidden)``); each following transposed convolution (kernel 4,
    stride 2, padding 1) doubles the side exactly, the last one emitting
    ``out_features // (H * W)`` channels (the likelihood's parameters of each of the C
    colour channels); the result is cropped to ``(H, W)`` and flattened channel-major, so
    that parameter j of every value ``(C, H, W)`` is the j-th block of ``C * H * W``
    outputs. Leading dimensions of the input (particles, batch) are kept.

    Args:
        in_features: size of the input.
        out_features: ``C * H * W`` times the likelihood's parameters per value.
        hidden: channels of the feature maps from the coarsest to the finest (at least one).
        activation_name: a key of :data:`ACTIVATIONS`.
        image_shape: ``(C, H, W)``, or ``(H, W)`` for one channel; required.

    References:
        Unsupervised Representation Learning with Deep Convolutional Generative Adversarial
        Networks (Radford et al., 2016)
    """
    return _TransposedConv(in_features, out_features, hidden, activation_name, image_shape)


NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "gated_mlp": gated_mlp,
    "conv": conv,
}
"""Network name -> builder from data to a vector,
``(in_features, out_features, hidden, activation, image_shape)``."""

DEFAULT_HIDDEN: dict[str, tuple[int, ...]] = {
    "mlp": (256, 256),
    "gated_mlp": (300, 300),
    "conv": (32, 64),
}
"""``hidden`` when none is given, per network from data: units per layer for an MLP, channels
of the stride-2 convolutions (finest first) for a conv network."""

GENERATIVE_DEFAULT_HIDDEN: dict[str, tuple[int, ...]] = {
    "mlp": (256, 256),
    "gated_mlp": (300, 300),
    "conv": (64, 32),
}
"""``hidden`` when none is given, per network to data (channels coarsest first for conv)."""

GENERATIVE_NETWORKS: dict[str, Callable[..., nn.Module]] = {
    "mlp": mlp,
    "gated_mlp": gated_mlp,
    "conv": deconv,
}
"""Network name -> builder from a vector to data, with the same signature."""


def network(
    name: str,
    in_features: int,
    out_features: int,
    hidden: Sequence[int] | None,
    activation_name: str,
    image_shape: Sequence[int] | None = None,
    generative: bool = False,
) -> nn.Module:
    """Builds the network :data:`NETWORKS` (or :data:`GENERATIVE_NETWORKS`) names.

    Args:
        name: a key of :data:`NETWORKS`.
        in_features: size of the input.
        out_features: size of the output.
        hidden: hidden layer sizes (units for ``mlp``, channels for ``conv``); None for the
            network's default (:data:`DEFAULT_HIDDEN`, :data:`GENERATIVE_DEFAULT_HIDDEN`).
        activation_name: a key of :data:`ACTIVATIONS`.
        image_shape: ``(C, H, W)`` (or ``(H, W)``) for image data, else None.
        generative: build the network from a vector to data (a decoder's).
    """
    builders = GENERATIVE_NETWORKS if generative else NETWORKS
    if name not in builders:
        raise ValueError(f"unknown network {name!r}; valid: {', '.join(builders)}")
    if hidden is None:
        hidden = (GENERATIVE_DEFAULT_HIDDEN if generative else DEFAULT_HIDDEN)[name]
    return builders[name](in_features, out_features, hidden, activation_name, image_shape)


INITS = ("torch", "glorot", "he")
"""Ways to start the weights of a network's linear layers (``initialize``)."""


@torch.no_grad()
def initialize(module: nn.Module, scheme: str) -> None:
    """Starts every ``nn.Linear`` inside ``module`` by ``scheme``.

    Args:
        module: a network (or any module holding linear layers).
        scheme: ``"torch"``, PyTorch's own start (nothing changes); ``"glorot"``, weights
            uniform on +-sqrt(6 / (fan_in + fan_out)) and biases zero (Glorot and Bengio;
            Burda et al.'s VAE and IWAE); ``"he"``, weights normal with variance
            2 / fan_in, biases as PyTorch starts them (He et al.; Tomczak and Welling's
            VampPrior code).

    References:
        Understanding the difficulty of training deep feedforward neural networks (Glorot and
        Bengio, 2010); Delving Deep into Rectifiers (He et al., 2015)
    """
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; valid: {', '.join(INITS)}")
    if scheme == "torch":
        return
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if scheme == "glorot":
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
            else:
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")


def image_layout(
    image_shape: Sequence[int] | None, features: int | None = None
) -> tuple[int, int, int]:
    """Checks that ``image_shape`` is ``(C, H, W)``, or ``(H, W)`` for one channel, with
    ``C * H * W == features`` if given: the one reading of an image shape.

    Returns:
        ``(C, H, W)`` as ints.
    """
    if image_shape is None:
        raise ValueError("a conv network needs image data (image_shape is None)")
    shape = tuple(image_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"image_shape must be (C, H, W) or (H, W), got {tuple(image_shape)}")
    channels, height, width = (int(n) for n in shape)
    if features is not None and channels * height * width != features:
        raise ValueError(f"image_shape {tuple(image_shape)} does not match {features} features")
    return channels, height, width


def check_sizes(sizes: Sequence[int], what: str) -> list[int]:
    """Checks that layer sizes are positive integers; returns them as a list of ints."""
    if any(int(s) != s or s < 1 for s in sizes):
        raise ValueError(f"{what} must be positive integers, got {list(sizes)}")
    return [int(s) for s in sizes]
