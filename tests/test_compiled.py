"""The compiled training step: the traced program gives Pyro's loss and gradients.

Each case traces the step on one batch, verifies it against Pyro on a second, then replays
it on a third from the same random state as an eager Pyro step: float64, so the two agree to
1e-9 (the only differences are sums reordered and the Python scalars Pyro reads).
"""

from __future__ import annotations

import pytest
import torch
from test_components import ALL, FEATURES, build

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import fit
from pyrovae.inference.algorithms.compiled import (
    AUTO_MIN_STEPS,
    CompiledStep,
    NotCompilable,
    compile_wanted,
)
from pyrovae.inference.algorithms.objectives import analytic_kl, elbo, enumerated_elbo, iwae
from pyrovae.inference.algorithms.schedules import (
    CyclicalAnnealing,
    FreeBits,
    KLWeight,
    LinearWarmup,
)
from pyrovae.inference.experiment.build import build as build_spec
from pyrovae.inference.experiment.spec import load_spec
from pyrovae.model import VAE, Bernoulli, Decoder, StandardNormal

TOL = 1e-9


def _batches(features: int, labels: int = 0, partial: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        x = torch.bernoulli(torch.full((6, features), 0.4), generator=g).double()
        if labels:
            code = torch.eye(labels, dtype=torch.float64)[torch.randint(labels, (6,), generator=g)]
            if partial:
                code[:3] = 0  # unlabelled rows
            x = torch.cat([x, code], 1)
        out.append(x)
    return out


def _eager(loss_fn, params, x, handler):
    with handler:
        loss = loss_fn(x)
    grads = torch.autograd.grad(loss / len(x), params, allow_unused=True)
    return loss.detach(), grads


def assert_replay_matches_pyro(model, guide, objective, batches, schedule=None):
    model.double()
    guide.double()
    loss_fn = objective(model, guide)
    params = list(loss_fn.parameters())
    step = CompiledStep(loss_fn, params, schedule, inductor=False)
    step(batches[0], 0)  # traced
    step(batches[1], 1)  # verified against Pyro
    assert step.reasons == [] and step.compiled_signatures == 1
    torch.manual_seed(5)
    loss, grads = step(batches[2], 2)  # the replayed graph
    torch.manual_seed(5)
    handler = schedule.handler(2) if schedule is not None else KLWeight(1.0)
    eager_loss, eager_grads = _eager(loss_fn, params, batches[2], handler)
    torch.testing.assert_close(loss, eager_loss, atol=TOL * abs(eager_loss.item()), rtol=0)
    for name_grad, (a, b) in enumerate(zip(grads, eager_grads, strict=True)):
        assert (a is None) == (b is None), name_grad
        if a is not None:
            torch.testing.assert_close(a, b, atol=TOL, rtol=1e-7)


@pytest.mark.parametrize("case", ALL)
def test_every_registered_component_replays_pyros_step(case):
    torch.manual_seed(0)
    model, guide = build(case, latent_dim=2)
    batches = [x * 0.9 + 0.05 if case[1] == "beta" else x for x in _batches(FEATURES)]
    assert_replay_matches_pyro(model, guide, elbo(), batches)


OBJECTIVES = {
    "elbo": elbo(),
    "elbo-3": elbo(3),
    "stl": elbo(1, "stl"),
    "iwae": iwae(4),
    "iwae-stl": iwae(4, "stl"),
    "dreg": iwae(4, "dreg"),
    "analytic_kl": analytic_kl(),
}
SCHEDULES = {
    "warmup": LinearWarmup(10),
    "cyclical": CyclicalAnnealing(4),
    "free_bits": FreeBits(0.5),
}


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_replays_pyros_step(objective):
    torch.manual_seed(0)
    model, guide = build(("prior", "standard_normal", {}), latent_dim=2)
    assert_replay_matches_pyro(model, guide, OBJECTIVES[objective], _batches(FEATURES))


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_kl_schedules_replay_with_the_weight_of_each_step(schedule):
    torch.manual_seed(0)
    model, guide = build(("prior", "standard_normal", {}), latent_dim=2)
    assert_replay_matches_pyro(model, guide, elbo(), _batches(FEATURES), SCHEDULES[schedule])


SPECS = {
    "two layers": (["model.layers=[{latent_dim=2, hidden=[8]}]"], 0, False, elbo()),
    "skip hierarchy, vamp": (
        [
            "model.layers=[{latent_dim=2, hidden=[8]}]",
            'model.hierarchy="skip"',
            'model.prior={kind="vamp", components=3}',
        ],
        0,
        False,
        iwae(3, "dreg"),
    ),
    "cvae": (['model.labels="context"', "model.classes=3"], 3, False, elbo()),
    "m2": (['model.labels="latent"', "model.classes=3"], 3, True, enumerated_elbo()),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_stacked_conditional_and_m2_models_replay_pyros_step(name):
    overrides, classes, partial, objective = SPECS[name]
    spec = load_spec(None, [*overrides, "model.latent_dim=2", "guide.encoder.hidden=[8]"])
    torch.manual_seed(0)
    model, guide = build_spec(spec, FEATURES + classes, (8, 8))
    batches = _batches(FEATURES, classes, partial)
    assert_replay_matches_pyro(model, guide, objective, batches)


class _BranchesOnData(torch.nn.Module):
    """A model whose Python reads the data: a trace would freeze the branch it took."""

    def __init__(self) -> None:
        super().__init__()
        self.vae = VAE(StandardNormal(2), Decoder(2, 8, [8]), Bernoulli())
        self.shift = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> None:
        if x.sum() > 20:  # a Python branch on the batch's values
            x = x.flip(0)
        self.vae(x)


def test_a_step_that_reads_tensor_values_trains_eagerly_with_one_line(capsys):
    torch.manual_seed(0)
    model = _BranchesOnData()
    guide = AmortizedGuide(DiagonalNormal(8, 2, hidden=[8]))
    x = torch.bernoulli(torch.full((64, 8), 0.5), generator=torch.Generator().manual_seed(2))
    x[:32] = 0  # the first batch is below the threshold, the next above it
    loss_fn = elbo()(model, guide)
    params = list(loss_fn.parameters())
    step = CompiledStep(loss_fn, params, inductor=False)
    step(x[:16], 0)
    torch.manual_seed(1)
    loss, _ = step(x[48:], 1)
    torch.manual_seed(1)
    eager_loss, _ = _eager(loss_fn, params, x[48:], KLWeight(1.0))
    assert step.compiled_signatures == 0 and len(step.reasons) == 1
    assert torch.equal(loss, eager_loss)  # the eager result, not the frozen branch
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs eagerly" in err and "16x8" in err


def test_fit_compiled_trains_like_eager_fit():
    """Inductor compiles the main graph; the replayed draws are Pyro's, so the two runs agree."""
    x = torch.bernoulli(torch.full((200, 16), 0.3), generator=torch.Generator().manual_seed(0))
    histories = {}
    for mode in ("off", "on"):
        torch.manual_seed(0)
        model = VAE(StandardNormal(2), Decoder(2, 16, [8]), Bernoulli())
        guide = AmortizedGuide(DiagonalNormal(16, 2, hidden=[8]))
        histories[mode] = fit(
            model, guide, x[:160], validation=x[160:], epochs=2, batch_size=32,
            progress=False, compile=mode, kl_schedule=LinearWarmup(5),
        )  # fmt: skip
    for eager, compiled in zip(histories["off"], histories["on"], strict=True):
        assert compiled["train_elbo"] == pytest.approx(eager["train_elbo"], rel=1e-4)
        assert compiled["validation_elbo"] == pytest.approx(eager["validation_elbo"], rel=1e-4)


def test_compile_modes():
    assert not compile_wanted("auto", AUTO_MIN_STEPS - 1)
    assert compile_wanted("auto", AUTO_MIN_STEPS) and compile_wanted("on", 1)
    assert compile_wanted(True, 1) and not compile_wanted(False, 10**6)
    assert not compile_wanted("off", 10**6)
    with pytest.raises(ValueError, match="compile must be one of auto, on, off"):
        compile_wanted("fast", 1)


def test_programs_that_are_not_modules_are_not_compiled():
    def model(x):
        pass

    loss_fn = elbo()(model, model)
    with pytest.raises(NotCompilable, match="not both nn.Modules"):
        CompiledStep(loss_fn, [])
