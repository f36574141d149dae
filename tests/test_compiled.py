"""The compiled training step: the traced program gives Pyro's loss and gradients.

Each case traces the step on one batch, verifies it against Pyro on a second, then replays
it on a third from the same random state as an eager Pyro step: float64, so the two agree to
1e-9 (the only differences are sums reordered and the Python scalars Pyro reads).
"""

from __future__ import annotations

import pyro
import pytest
import torch
from test_components import ALL, FEATURES, build
from torch.fx.experimental.proxy_tensor import make_fx

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import fit
from pyrovae.inference.algorithms.compiled import (
    AUTO_MIN_STEPS,
    COMPILE_AFTER_REPLAYS,
    ONEDNN_MIN_ROWS,
    CompiledStep,
    NotCompilable,
    compile_wanted,
    onednn_linears,
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
from pyrovae.model import VAE, Bernoulli, Decoder, Labelled, StandardNormal

TOL = 1e-9


def _batches(features: int, labels: int = 0, partial: bool = False) -> list:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(3):
        x = torch.bernoulli(torch.full((6, features), 0.4), generator=g).double()
        if labels:
            y = torch.randint(labels, (6,), generator=g)
            x = Labelled(x, y, torch.arange(6) >= 3 if partial else None)  # M2: 3 unlabelled
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
    model, guide = build_spec(spec, FEATURES, (8, 8))
    batches = _batches(FEATURES, classes, partial)
    assert_replay_matches_pyro(model, guide, objective, batches)


def test_m2_batches_with_other_numbers_of_labelled_rows_replay_pyros_step(capsys):
    # Each batch selects its labelled rows: a graph traced on 3 of 6 cannot replay 2 of 6.
    spec = load_spec(None, [*SPECS["m2"][0], "model.latent_dim=2", "guide.encoder.hidden=[8]"])
    torch.manual_seed(0)
    model, guide = build_spec(spec, FEATURES, (8, 8))
    model.double()
    guide.double()
    loss_fn = enumerated_elbo()(model, guide)
    params = list(loss_fn.parameters())
    step = CompiledStep(loss_fn, params, inductor=False)
    g = torch.Generator().manual_seed(0)

    def batch(labelled: int) -> Labelled:
        x = torch.bernoulli(torch.full((6, FEATURES), 0.4), generator=g).double()
        known = torch.randperm(6, generator=g) < labelled  # labelled rows at new positions
        return Labelled(x, torch.randint(3, (6,), generator=g), known)

    for i, labelled in enumerate([3, 2, 3, 2, 3, 2]):  # traced, verified, replayed
        x = batch(labelled)
        torch.manual_seed(i)
        loss, grads = step(x, i)
        torch.manual_seed(i)
        eager_loss, eager_grads = _eager(loss_fn, params, x, KLWeight(1.0))
        torch.testing.assert_close(loss, eager_loss, atol=TOL * abs(eager_loss.item()), rtol=0)
        for a, b in zip(grads, eager_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=TOL, rtol=1e-7)
    assert step.reasons == [] and step.compiled_signatures == 2
    assert capsys.readouterr().err == ""


class _FrozenShape(torch.nn.Module):
    """A model whose Python sizes a tensor by the data's values: its trace freezes the size."""

    def __init__(self) -> None:
        super().__init__()
        self.vae = VAE(StandardNormal(2), Decoder(2, 8, [8]), Bernoulli())
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> None:
        self.vae(x)
        rows = x[x[:, 0] > 0.5]  # as many rows as have a first pixel on
        pyro.factor("on", self.weight * rows.reshape(len(rows), 8).sum())


def test_a_graph_that_cannot_replay_the_next_batch_trains_eagerly_with_one_line(capsys):
    torch.manual_seed(0)
    guide = AmortizedGuide(DiagonalNormal(8, 2, hidden=[8]))
    loss_fn = elbo()(_FrozenShape(), guide)
    params = list(loss_fn.parameters())
    step = CompiledStep(loss_fn, params, inductor=False)
    x = torch.zeros(16, 8)
    x[:5, 0] = 1
    step(x, 0)  # traced with 5 selected rows
    x[:9, 0] = 1
    torch.manual_seed(1)
    loss, _ = step(x, 1)  # 9 rows: the replay fails, the eager result stands
    torch.manual_seed(1)
    eager_loss, _ = _eager(loss_fn, params, x, KLWeight(1.0))
    assert torch.equal(loss, eager_loss)
    assert step.compiled_signatures == 0 and len(step.reasons) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runs eagerly: its replay failed" in err[0]


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
            model, guide, x[:160], validation=x[160:], batch_size=32,
            epochs=3, compile=mode, kl_schedule=LinearWarmup(5),
        )  # fmt: skip
    for eager, compiled in zip(histories["off"], histories["on"], strict=True):
        assert compiled["train_elbo"] == pytest.approx(eager["train_elbo"], rel=1e-4)
        assert compiled["validation_elbo"] == pytest.approx(eager["validation_elbo"], rel=1e-4)


def test_inductor_compiles_a_signature_once_it_has_been_replayed_often():
    """A signature met a few times replays its FX graph; one met often is compiled, and the
    compiled step gives the replayed step's loss and gradients (float32, Inductor)."""
    torch.manual_seed(0)
    model = VAE(StandardNormal(2), Decoder(2, 16, [8]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(16, 2, hidden=[8]))
    loss_fn = elbo()(model, guide)
    params = list(loss_fn.parameters())
    step = CompiledStep(loss_fn, params)
    x = torch.bernoulli(torch.full((8, 16), 0.3), generator=torch.Generator().manual_seed(0))
    for i in range(COMPILE_AFTER_REPLAYS):  # traced, verified, then replayed
        step(x, i)
    torch.manual_seed(7)
    replayed = step(x, 0)  # the last replay before the compile
    assert step.inductor_signatures == 0
    step(x[:5], 0)  # another signature, traced
    torch.manual_seed(7)
    compiled = step(x, 0)
    assert step.inductor_signatures == 1
    torch.testing.assert_close(compiled[0], replayed[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled[1], replayed[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


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


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_onednn_linears_replace_float32_linear_layers_and_agree():
    """Each float32 ``nn.Linear`` of a traced graph runs through oneDNN's linear, with the
    same result to float32 rounding; float64 graphs are left as they are."""
    net = torch.nn.Sequential(
        torch.nn.Linear(20, 30), torch.nn.Softplus(), torch.nn.Linear(30, 7, bias=True)
    )
    x = torch.randn(ONEDNN_MIN_ROWS, 20, generator=torch.Generator().manual_seed(0))

    def linears(graph: torch.fx.GraphModule) -> dict[str, int]:
        targets = [str(n.target) for n in graph.graph.nodes if n.op == "call_function"]
        return {
            name: targets.count(name)
            for name in ("aten.addmm.default", "pyrovae.onednn_linear.default")
        }

    graph = make_fx(net)(x)
    expected = graph(x)
    assert linears(onednn_linears(graph)) == {
        "aten.addmm.default": 0,
        "pyrovae.onednn_linear.default": 2,
    }
    torch.testing.assert_close(graph(x), expected, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(graph, dynamic=False)
    with torch.no_grad():  # as the traced programs replay
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)

    few_rows = make_fx(net)(x[:-1])
    assert linears(onednn_linears(few_rows))["pyrovae.onednn_linear.default"] == 0
    double = make_fx(net.double())(x.double())
    assert linears(onednn_linears(double))["pyrovae.onednn_linear.default"] == 0
