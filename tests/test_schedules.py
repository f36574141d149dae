"""KL schedules: weights per step, handlers against hand-computed gradients, training, spec."""

from __future__ import annotations

from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import pytest
import torch
from interrupt import InterruptAt
from torch import Tensor, nn
from torch.distributions import kl_divergence

from pyrovae.guides import AmortizedGuide, DiagonalNormal, FullCovarianceNormal
from pyrovae.inference import PyrovaeError, Spec, fit, load_data, load_spec
from pyrovae.inference.algorithms.objectives import analytic_kl, elbo, iwae
from pyrovae.inference.algorithms.schedules import (
    SCHEDULES,
    ConstantBeta,
    CyclicalAnnealing,
    FreeBits,
    KLWeight,
    LinearWarmup,
)
from pyrovae.inference.experiment.build import build_schedule
from pyrovae.inference.experiment.callbacks import BatchTransform, Checkpointing
from pyrovae.inference.experiment.recipes import adam
from pyrovae.inference.experiment.runs import Checkpoint
from pyrovae.model import VAE, Bernoulli, Decoder, Gaussian, StandardNormal

LATENT_DIM, FEATURES, BATCH = 3, 4, 6


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "dynamic")


def test_weights_per_step():
    assert [ConstantBeta(4.0)(s) for s in (0, 7, 10**6)] == [4.0, 4.0, 4.0]
    warmup = LinearWarmup(warmup_steps=100)
    assert [warmup(s) for s in (0, 25, 50, 100, 5000)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert LinearWarmup(10, beta=4.0, start=1.0)(5) == 2.5
    cycle = CyclicalAnnealing(period=100, ratio=0.5)
    steps = (0, 10, 25, 50, 75, 99, 100, 125, 250)
    assert [cycle(s) for s in steps] == [0.0, 0.2, 0.5, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0]
    assert CyclicalAnnealing(period=4, ratio=1.0, beta=2.0)(3) == 1.5
    assert isinstance(ConstantBeta(1.0).handler(0), nullcontext)  # the ELBO: no handler at all
    assert LinearWarmup(4).handler(2).beta == 0.5


class PerDimensionNormal(nn.Module):
    """A diagonal Gaussian q with one loc and scale per latent dimension, whatever x."""

    def __init__(self, loc: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.loc = nn.Parameter(loc)
        self.log_scale = nn.Parameter(scale.log())

    def forward(self, x: Tensor) -> dist.Distribution:
        shape = (x.shape[0], self.loc.shape[0])
        return dist.Normal(self.loc.expand(shape), self.log_scale.exp().expand(shape)).to_event(1)


def small_model() -> tuple[VAE, AmortizedGuide, Tensor]:
    torch.manual_seed(0)
    model = VAE(
        StandardNormal(LATENT_DIM).double(),
        nn.Linear(LATENT_DIM, FEATURES).double(),
        Gaussian(scale=0.5).double(),
    )
    guide = AmortizedGuide(DiagonalNormal(FEATURES, LATENT_DIM, hidden=[5]).double())
    return model, guide, torch.randn(BATCH, FEATURES, dtype=torch.float64)


def loss_and_grads(objective, model, guide, x, handler=None) -> tuple[Tensor, Tensor]:
    pyro.set_rng_seed(1)
    with handler or nullcontext():
        loss = objective(model, guide)(x)
    return loss.detach(), _flat_grad(loss, model, guide)


def hand_loss_and_grads(model, guide, x, latent_term) -> tuple[Tensor, Tensor]:
    """``-(log p(x|z) + latent_term(q, p, z))`` summed over the batch, on the same sample of
    z as :func:`loss_and_grads`."""
    pyro.set_rng_seed(1)
    q = guide.encoder(x)
    z = q.rsample()
    loss = -(model.decode(z).log_prob(x).sum() + latent_term(q, model.prior(), z))
    return loss.detach(), _flat_grad(loss, model, guide)


def _flat_grad(loss: Tensor, model: nn.Module, guide: nn.Module) -> Tensor:
    params = [*model.parameters(), *guide.parameters()]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


def monte_carlo_kl(q, p, z):
    return (q.log_prob(z) - p.log_prob(z)).sum()


def closed_form_kl(q, p, z):
    return kl_divergence(q, p.expand(q.batch_shape)).sum()


@pytest.mark.parametrize("beta", [0.0, 0.25, 4.0])
@pytest.mark.parametrize(
    "objective, kl",
    [(elbo(), monte_carlo_kl), (iwae(1), monte_carlo_kl), (analytic_kl(), closed_form_kl)],
    ids=["elbo", "iwae", "analytic_kl"],
)
def test_kl_weight_scales_the_gradient_of_exactly_the_latent_sites(objective, kl, beta):
    """The gradient is that of ``log p(x|z) - beta (log q - log p)`` on the sample (or of
    ``- beta KL`` in closed form); the value stays the true loss, the one with beta = 1."""
    model, guide, x = small_model()
    plain, _ = loss_and_grads(objective, model, guide, x)
    loss, grads = loss_and_grads(objective, model, guide, x, KLWeight(beta))
    true_loss, _ = hand_loss_and_grads(model, guide, x, lambda q, p, z: -kl(q, p, z))
    _, expected = hand_loss_and_grads(model, guide, x, lambda q, p, z: -beta * kl(q, p, z))
    assert torch.equal(loss, plain)
    torch.testing.assert_close(loss, true_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "objective", [elbo(), elbo(1, "stl"), iwae(1), analytic_kl()], ids=["elbo", "stl", "iwae", "kl"]
)
def test_free_bits_gradient_is_that_of_the_kl_clamped_per_dimension(objective):
    """``log p(x|z) - B sum_d max(lambda, mean_b KL_bd)``, the KL per dimension in closed form."""
    model, guide, x = small_model()
    floor = 0.3
    with torch.no_grad():
        q = guide.encoder(x)
        mean_kl = kl_divergence(q.base_dist, model.prior().base_dist).mean(0)
    assert (mean_kl < floor).any() and (mean_kl > floor).any()  # both sides of the floor

    def clamped(q, p, z):
        kl = kl_divergence(q.base_dist, p.base_dist.expand(q.base_dist.batch_shape))
        return -BATCH * kl.mean(0).clamp(min=floor).sum()

    plain, _ = loss_and_grads(objective, model, guide, x)
    loss, grads = loss_and_grads(objective, model, guide, x, FreeBits(floor))
    _, expected = hand_loss_and_grads(model, guide, x, clamped)
    assert torch.equal(loss, plain)
    torch.testing.assert_close(grads, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "objective", [elbo(4), analytic_kl(4), iwae(4)], ids=["elbo", "analytic_kl", "iwae"]
)
def test_free_bits_leaves_dimensions_below_the_floor_alone(objective):
    """With a decoder that ignores z, only the KL moves q: not in dimensions under lambda."""
    model = VAE(StandardNormal(3), nn.Linear(3, FEATURES), Gaussian(scale=1.0))
    nn.init.zeros_(model.decoder.weight)
    loc, scale = torch.tensor([0.1, 2.0, 0.2]), torch.tensor([1.0, 1.0, 2.0])
    encoder = PerDimensionNormal(loc, scale)
    # KL per dimension 0.5 * (scale^2 + loc^2 - 1) - log scale: 0.005, 2, 0.827.
    with FreeBits(0.5):
        loss = objective(model, AmortizedGuide(encoder))(torch.randn(BATCH, FEATURES))
    d_loc, d_log_scale = torch.autograd.grad(loss, [encoder.loc, encoder.log_scale])
    assert d_loc[0] == 0 and d_log_scale[0] == 0
    torch.testing.assert_close(d_loc[1:], BATCH * loc[1:])
    torch.testing.assert_close(d_log_scale[1:], BATCH * (scale[1:] ** 2 - 1))


def test_free_bits_needs_a_factorized_guide_and_prior():
    model = VAE(StandardNormal(3), nn.Linear(3, FEATURES), Gaussian(scale=1.0))
    guide = AmortizedGuide(FullCovarianceNormal(FEATURES, 3, hidden=[5]))
    with pytest.raises(PyrovaeError, match="factorized.*site 'z' has guide FullRankNormal"):
        with FreeBits(0.5):
            elbo()(model, guide)(torch.randn(BATCH, FEATURES))


EXAMPLES = {
    "constant": {"beta": 4.0},
    "linear": {"warmup_steps": 3},
    "cyclical": {"period": 4},
    "free_bits": {"lambda_": 0.5},
}


@pytest.mark.parametrize("kind", EXAMPLES)
def test_every_schedule_keeps_the_loss_value_and_gives_gradients(kind):
    assert set(EXAMPLES) == set(SCHEDULES)
    schedule = build_schedule(Spec().replace(train={"kl": {"kind": kind, **EXAMPLES[kind]}}))
    model, guide, x = small_model()
    for step in range(4):
        plain, _ = loss_and_grads(elbo(2), model, guide, x)
        loss, grads = loss_and_grads(elbo(2), model, guide, x, schedule.handler(step))
        assert torch.equal(loss, plain) and torch.isfinite(grads).all()


def small_vae(features=64, latent_dim=4, hidden=(32,)):
    model = VAE(StandardNormal(latent_dim), Decoder(latent_dim, features, hidden), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(features, latent_dim, hidden=hidden))
    return model, guide


def test_logged_elbo_is_the_true_one(digits):
    """With lr = 0 parameters stay put, so the logged train and validation ELBO of a beta = 4
    run must equal those of a plain run to the last bit; with lr > 0 the runs differ."""

    def run(kl_schedule, lr):
        pyro.set_rng_seed(0)
        model, guide = small_vae()
        history = fit(
            model,
            guide,
            digits.train[:300],
            validation=digits.validation[:200],
            kl_schedule=kl_schedule,
            epochs=1,
            optimizer=adam(nn.ModuleList([model, guide]).parameters(), lr),
            callbacks=[BatchTransform(torch.bernoulli)],
        )
        return history[0], model.decoder.state_dict()

    (plain, _), (weighted, _) = run(None, 0.0), run(ConstantBeta(4.0), 0.0)
    for key in ("train_elbo", "validation_elbo"):
        assert plain[key] == weighted[key]
    (_, plain_state), (_, weighted_state) = run(None, 1e-2), run(ConstantBeta(4.0), 1e-2)
    assert any(not torch.equal(plain_state[k], weighted_state[k]) for k in plain_state)


def test_checkpoint_resume_matches_uninterrupted_with_a_schedule(tmp_path, digits):
    """The warm-up spans the interruption; its step comes from epoch x steps per epoch."""
    x = digits.train[:400]  # 4 steps per epoch: the warm-up runs through epoch 3
    steps: list[int] = []

    class Recorded(LinearWarmup):
        def handler(self, step):
            steps.append(step)
            return super().handler(step)

    def run(run_dir, epochs, callbacks=()):
        pyro.set_rng_seed(0)
        model, guide = small_vae()
        fit(
            model,
            guide,
            x,
            kl_schedule=Recorded(warmup_steps=10),
            epochs=epochs,
            callbacks=[Checkpointing(run_dir), *callbacks, BatchTransform(torch.bernoulli)],
        )
        return model

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = run(tmp_path / "a", 4)
    assert steps == list(range(16))

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", 4, [InterruptAt(3)])
    assert Checkpoint.load(tmp_path / "b").epoch == 2

    steps.clear()
    resumed = run(tmp_path / "b", 4)
    assert steps == list(range(8, 16))
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=0, atol=0)


def test_spec_round_trip(tmp_path):
    assert Spec().train.kl == {"kind": "constant", "beta": 1.0}
    assert build_schedule(Spec()) == ConstantBeta(1.0)
    assert build_schedule(load_spec(None, ["train.kl.beta=4.0"])) == ConstantBeta(4.0)
    spec = load_spec(None, ['train.kl={ kind = "cyclical", period = 500, ratio = 0.25 }'])
    file = tmp_path / "spec.toml"
    file.write_text(spec.to_toml())
    assert load_spec(file) == spec
    assert build_schedule(spec) == CyclicalAnnealing(period=500, ratio=0.25)
    linear = load_spec(None, ['train.kl={ kind = "linear", warmup_steps = 1000 }'])
    assert build_schedule(linear) == LinearWarmup(warmup_steps=1000)
    free_bits = build_schedule(load_spec(None, ['train.kl={ kind = "free_bits", lambda_ = 0.5 }']))
    assert isinstance(free_bits, FreeBits) and free_bits.lambda_ == 0.5


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.kl.beta=-1.0", r"train.kl \(kind 'constant'\): beta must be a finite number >= 0"),
        ('train.kl={ kind = "linear", warmup_steps = 0 }', "warmup_steps must be an integer >= 1"),
        ('train.kl={ kind = "linear" }', "missing 1 required positional argument: 'warmup_steps'"),
        ('train.kl={ kind = "cyclical", period = 10, ratio = 0.0 }', r"ratio must be in \(0, 1\]"),
        ('train.kl={ kind = "cyclical", period = 1 }', "period must be an integer >= 2, got 1"),
        ('train.kl={ kind = "free_bits", lambda_ = -0.5 }', "lambda_ must be a finite number"),
        ('train.kl.kind="sigmoid"', "valid: constant, linear, cyclical, free_bits"),
        ("train.kl.warmup=5", "unknown option train.kl.warmup for kind 'constant'; valid: beta"),
    ],
)
def test_bad_options_are_one_clear_error(override, message):
    with pytest.raises(PyrovaeError, match=message) as error:
        build_schedule(load_spec(None, [override]))
    assert "\n" not in str(error.value)


def test_handlers_check_their_arguments():
    with pytest.raises(ValueError, match="beta must be a finite number >= 0, got -0.5"):
        KLWeight(-0.5)
    with pytest.raises(ValueError, match="lambda_ must be a finite number >= 0, got nan"):
        FreeBits(float("nan"))
