"""Names of the sample sites and the data plate, shared by every model and guide."""

from __future__ import annotations

LATENT = "z"
"""The latent sample site."""

OBSERVED = "x"
"""The observed sample site."""

DATA_PLATE = "data"
"""The plate over data points (batch dimension -1)."""


def latent_sites(layers: int = 1) -> tuple[str, ...]:
    """The latent sites of a model with ``layers`` stochastic layers, nearest the data first:
    ``("z",)`` for one layer, ``("z1", "z2", ...)`` for a stack. Model and guide both take
    their names from here."""
    if int(layers) != layers or layers < 1:
        raise ValueError(f"layers must be a positive integer, got {layers}")
    return (LATENT,) if layers == 1 else tuple(f"{LATENT}{i}" for i in range(1, int(layers) + 1))
