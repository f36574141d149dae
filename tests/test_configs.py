"""Every shipped config loads, builds, and takes one optimizer step on data shaped as its own:
MNIST's binary 28x28 images, or the photos' 3x32x32 patches of 8-bit levels."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pytest
import torch

from pyrovae.inference import build, load_spec
from pyrovae.inference.experiment.build import build_objective
from pyrovae.model import Labelled

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 16


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_a_shipped_config_builds_and_steps(path, device):
    spec = load_spec(path)
    classes = spec.model.classes if spec.model.labels != "none" else 0
    pyro.set_rng_seed(0)
    shape = (3, 32, 32) if spec.data.name == "sklearn-photos" else (28, 28)
    features = math.prod(shape)
    model, guide = build(spec, features, shape)
    x = torch.bernoulli(torch.full((6, features), 0.3))
    if len(shape) == 3:
        x = torch.randint(0, 256, (6, features)).float() / 255
    if classes:
        known = torch.arange(6) % 2 == 1 if spec.model.labels == "latent" else None  # M2: half
        x = Labelled(x, torch.arange(6) % classes, known)
    loss_fn = build_objective(spec)(model, guide).to(device)
    loss = loss_fn(x.to(device))
    loss.backward()
    assert torch.isfinite(loss) and loss.device.type == device
    assert all(p.grad is None or p.grad.device.type == device for p in loss_fn.parameters())
