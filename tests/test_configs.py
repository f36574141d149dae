"""Every shipped config loads, builds, and takes one optimizer step on MNIST-shaped data."""

from __future__ import annotations

from pathlib import Path

import pyro
import pytest
import torch

from pyrovae.inference import build, load_spec
from pyrovae.inference.experiment.build import build_objective

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
    model, guide = build(spec, 784 + classes, (28, 28))
    x = torch.bernoulli(torch.full((6, 784), 0.3))
    if classes:
        code = torch.eye(classes)[torch.arange(6) % classes]
        code[::2] = 0 if spec.model.labels == "latent" else code[::2]  # M2: half unlabelled
        x = torch.cat([x, code], 1)
    loss_fn = build_objective(spec)(model, guide).to(device)
    loss = loss_fn(x.to(device))
    loss.backward()
    assert torch.isfinite(loss) and loss.device.type == device
    assert all(p.grad is None or p.grad.device.type == device for p in loss_fn.parameters())
