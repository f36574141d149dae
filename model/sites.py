"""Names of the sample sites and the data plate, shared by every model and guide."""

from __future__ import annotations

LATENT = "z"
"""The latent sample site."""

OBSERVED = "x"
"""The observed sample site."""

DATA_PLATE = "data"
"""The plate over data points (batch dimension -1)."""
