"""Training on digits, checkpoints, resume, divergence and early stopping."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from interrupt import InterruptAt

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import TrainingDiverged, fit, load_data
from pyrovae.inference.experiment.callbacks import (
    BatchTransform,
    Checkpointing,
    EarlyStopping,
    GradientClipping,
)
from pyrovae.inference.experiment.recipes import adam
from pyrovae.inference.experiment.runs import CHECKPOINT, METRICS, Checkpoint
from pyrovae.model import VAE, Bernoulli, Decoder, StandardNormal


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "dynamic")


def small_vae(features=64, latent_dim=4, hidden=(32,)):
    model = VAE(StandardNormal(latent_dim), Decoder(latent_dim, features, hidden), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(features, latent_dim, hidden=hidden))
    return model, guide


def test_short_training_improves_validation_elbo(digits):
    pyro.set_rng_seed(0)
    model, guide = small_vae()
    history = fit(
        model,
        guide,
        digits.train,
        validation=digits.validation,
        epochs=8,
        callbacks=[BatchTransform(torch.bernoulli)],
    )
    assert [h["epoch"] for h in history] == list(range(1, 9))
    # 8 epochs take the validation ELBO from near the uniform-pixel value (64 log 2 = 44 nats)
    # well past what the first epoch reaches.
    assert history[-1]["validation_elbo"] > history[0]["validation_elbo"] + 3
    assert all(h["images_per_s"] > 0 and h["seconds"] > 0 for h in history)


def test_seeded_cpu_runs_are_reproducible(digits):
    states = []
    for _ in range(2):
        pyro.set_rng_seed(3)
        model, guide = small_vae()
        fit(
            model,
            guide,
            digits.train[:300],
            epochs=2,
            callbacks=[BatchTransform(torch.bernoulli)],
        )
        states.append(model.state_dict())
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_checkpoint_resume_matches_uninterrupted(tmp_path, digits):
    x = digits.train[:400]

    def run(run_dir, epochs, callbacks=()):
        pyro.set_rng_seed(0)
        model, guide = small_vae()
        fit(
            model,
            guide,
            x,
            validation=digits.validation,
            epochs=epochs,
            callbacks=[Checkpointing(run_dir), *callbacks, BatchTransform(torch.bernoulli)],
        )
        return model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run(tmp_path / "a", 4)

    # Kill the second run in the middle of epoch 3; its checkpoint stays at epoch 2.
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 4, [InterruptAt(3)])
    assert Checkpoint.load(tmp_path / "b").epoch == 2

    resumed = run(tmp_path / "b", 4)
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)
    rows = (tmp_path / "b" / METRICS).read_text().splitlines()
    assert rows[0] == (
        "epoch,train_elbo,validation_elbo,validation_reconstruction,validation_kl,"
        "validation_active_units,lr,seconds,images_per_s"
    )
    assert len(rows) == 5


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, digits):
    pyro.set_rng_seed(0)
    model, guide = small_vae()
    calls = {"n": 0}

    def poison(x):
        calls["n"] += 1
        return torch.full_like(x, math.nan) if calls["n"] > 12 else torch.bernoulli(x)

    with pytest.raises(TrainingDiverged, match="NaN or infinite in epoch 2.*epoch 1"):
        fit(
            model,
            guide,
            digits.train,
            epochs=3,
            callbacks=[Checkpointing(tmp_path), BatchTransform(poison)],
        )
    checkpoint = Checkpoint.load(tmp_path)
    assert checkpoint.epoch == 1
    assert all(torch.isfinite(v).all() for v in checkpoint.model.values())
    assert (tmp_path / CHECKPOINT).is_file()


def test_early_stopping_and_gradient_clipping(digits):
    pyro.set_rng_seed(0)
    model, guide = small_vae()
    history = fit(
        model,
        guide,
        digits.train[:200],
        validation=digits.validation,
        epochs=50,
        optimizer=adam(torch.nn.ModuleList([model, guide]).parameters(), 1e-1),
        callbacks=[EarlyStopping(1), GradientClipping(1.0), BatchTransform(torch.bernoulli)],
    )
    assert len(history) < 50
    scores = [h["validation_elbo"] for h in history]
    assert scores[-1] <= max(scores[:-1])


def test_bad_training_input(digits):
    model, guide = small_vae()
    with pytest.raises(Exception, match="support"):
        fit(model, guide, digits.train * 3, epochs=1)
    with pytest.raises(Exception, match="early stopping on a validation figure needs"):
        fit(model, guide, digits.train, epochs=1, callbacks=[EarlyStopping(2)])


def test_validation_terms_add_up(digits):
    pyro.set_rng_seed(0)
    model, guide = small_vae()
    history = fit(
        model,
        guide,
        digits.train,
        validation=digits.validation,
        epochs=2,
        callbacks=[BatchTransform(torch.bernoulli)],
    )
    for h in history:
        assert h["validation_elbo"] == pytest.approx(
            h["validation_reconstruction"] - h["validation_kl"]
        )
        assert h["validation_kl"] > 0


@pytest.mark.gpu
def test_fit_on_cuda_keeps_everything_on_the_device(tmp_path, digits):
    pyro.set_rng_seed(0)
    model, guide = small_vae()
    model.cuda()
    guide.cuda()
    history = fit(
        model,
        guide,
        digits.train,
        validation=digits.validation,
        epochs=2,
        callbacks=[Checkpointing(tmp_path), BatchTransform(torch.bernoulli)],
    )
    assert all(p.is_cuda for p in model.parameters())
    assert math.isfinite(history[-1]["validation_elbo"])
    assert Checkpoint.load(tmp_path).epoch == 2
