"""Parts the paper configs need: gated dense networks, Adam with normalized gradients, and
the best-validation checkpoint that early stopping selects."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import Callback, Checkpoint, Checkpointing, fit, load_run, train_run
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.build import build, build_optimizer
from pyrovae.inference.experiment.runs import BEST
from pyrovae.inference.experiment.spec import load_spec
from pyrovae.model import VAE, Bernoulli, Decoder, StandardNormal
from pyrovae.model.networks import GatedDense, gated_mlp, initialize, network

# --- gated dense layers ---------------------------------------------------------------------


def test_a_gated_layer_is_its_value_times_a_sigmoid_gate():
    torch.manual_seed(0)
    layer = GatedDense(5, 3, "tanh")
    x = torch.randn(4, 5)
    value = torch.tanh(x @ layer.value.weight.T + layer.value.bias)
    gate = 1 / (1 + torch.exp(-(x @ layer.gate.weight.T + layer.gate.bias)))
    torch.testing.assert_close(layer(x), value * gate)


def test_the_gated_mlp_is_the_vamp_papers_network():
    net = gated_mlp(784, 80, [300, 300], "identity")
    gated = [m for m in net if isinstance(m, GatedDense)]
    assert [(g.value.in_features, g.value.out_features) for g in gated] == [(784, 300), (300, 300)]
    assert isinstance(net[-1], nn.Linear) and net[-1].out_features == 80
    assert all(isinstance(g.activation, nn.Identity) for g in gated)
    # Two linear maps per gated layer, one at the end: the paper's parameter count.
    count = sum(p.numel() for p in net.parameters())
    assert count == 2 * (784 * 300 + 300) + 2 * (300 * 300 + 300) + 300 * 80 + 80
    # Leading dimensions (particles, batch) are kept, as every network here does.
    assert net(torch.zeros(2, 3, 784)).shape == (2, 3, 80)


def test_gated_mlp_is_a_network_for_encoders_and_decoders():
    assert isinstance(network("gated_mlp", 10, 4, None, "identity")[0], GatedDense)
    assert isinstance(network("gated_mlp", 4, 10, [8], "identity", generative=True)[0], GatedDense)
    spec = load_spec(
        None,
        [
            'model.decoder={kind="feedforward", network="gated_mlp", hidden=[8], activation="identity"}',
            'guide.encoder={kind="diagonal_normal", network="gated_mlp", hidden=[8], activation="identity"}',
        ],
    )
    assert spec.guide.encoder["network"] == "gated_mlp"


# --- Adam with normalized gradients ----------------------------------------------------------


def test_normalize_grad_steps_adam_on_unit_norm_gradients():
    torch.manual_seed(0)
    weights = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(5))]
    reference = [nn.Parameter(w.detach().clone()) for w in weights]
    spec = load_spec(None, ['train.optimizer={kind="adam", normalize_grad=true}', "train.lr=0.1"])
    optimizer = build_optimizer(spec, weights)
    plain = torch.optim.Adam(reference, lr=0.1)
    for step in range(3):
        grads = [torch.randn_like(w) * 10 ** (step + i) for i, w in enumerate(weights)]
        for w, r, g in zip(weights, reference, grads, strict=True):
            w.grad = g.clone()
            r.grad = g / (torch.linalg.vector_norm(g) + 1e-7)
        optimizer.step()
        plain.step()
        # The hook normalized the gradients in place before the step.
        for w in weights:
            torch.testing.assert_close(torch.linalg.vector_norm(w.grad), torch.tensor(1.0))
    for w, r in zip(weights, reference, strict=True):
        torch.testing.assert_close(w, r)


def test_normalize_grad_must_be_a_bool():
    with pytest.raises(PyrovaeError, match="normalize_grad"):
        spec = load_spec(None, ['train.optimizer={kind="adam", normalize_grad="yes"}'])
        build_optimizer(spec, [nn.Parameter(torch.zeros(1))])


# --- the best-validation checkpoint ---------------------------------------------------------


class Scripted(Callback):
    """Replaces each epoch's validation ELBO with a scripted value (if given) and keeps a
    copy of the model's and guide's parameters at every epoch."""

    def __init__(self, values: list[float] | None = None) -> None:
        self.values = values
        self.states: dict[int, tuple[dict, dict]] = {}

    def on_epoch_end(self, state):
        if self.values is not None:
            state.history[-1]["validation_elbo"] = self.values[state.epoch - 1]
        self.states[state.epoch] = (
            copy.deepcopy(state.model.state_dict()),
            copy.deepcopy(state.guide.state_dict()),
        )


def small_pair() -> tuple[VAE, AmortizedGuide]:
    return VAE(StandardNormal(2), Decoder(2, 16, [8]), Bernoulli()), AmortizedGuide(
        DiagonalNormal(16, 2, hidden=[8])
    )


@pytest.mark.parametrize(
    ("values", "best_from", "best"),
    [
        ([-5.0, -1.0, -2.0, -3.0], 1, 2),
        ([-1.0, -2.0, -1.5, -3.0], 2, 3),  # epoch 1 is still in the warm-up
        ([-2.0, -1.0, -1.0, -3.0], 1, 2),  # a tie keeps the first, as early stopping does
        ([-1.0, float("nan"), -3.0, -2.0], 1, 1),
    ],
)
def test_the_best_checkpoint_is_the_best_validation_epoch_after_the_warmup(
    tmp_path, values, best_from, best
):
    model, guide = small_pair()
    scripted = Scripted(values)
    checkpointing = Checkpointing(tmp_path, best="validation_elbo", best_from=best_from)
    x = torch.rand(64, 16).round()
    fit(model, guide, x, validation=x[:16], epochs=len(values), batch_size=32,
        callbacks=[scripted, checkpointing])  # fmt: skip
    kept = Checkpoint.load(tmp_path, name=BEST)
    assert kept.epoch == best
    model_state, guide_state = scripted.states[best]
    for key, value in model_state.items():
        torch.testing.assert_close(kept.model[key], value)
    for key, value in guide_state.items():
        torch.testing.assert_close(kept.guide[key], value)
    assert Checkpoint.load(tmp_path).epoch == len(values)


def test_a_run_with_early_stopping_keeps_and_loads_its_best_epoch(tmp_path):
    overrides = [
        "model.latent_dim=2",
        "model.decoder.hidden=[8]",
        "guide.encoder.hidden=[8]",
        "train.batch_size=512",
        "train.epochs=4",
        "train.patience=2",
    ]
    scripted = Scripted()
    run = train_run(None, tmp_path / "r", overrides=overrides, progress=False,
                    callbacks=[scripted])  # fmt: skip
    best = load_run(tmp_path / "r", checkpoint="best")
    assert best.epoch in range(1, run.epoch + 1)
    history = {h["epoch"]: h for h in Checkpoint.load(tmp_path / "r").history}
    assert best.epoch == max(history, key=lambda e: (history[e]["validation_elbo"], -e))
    model_state, _ = scripted.states[best.epoch]
    for key, value in model_state.items():
        torch.testing.assert_close(best.model.state_dict()[key], value)
    # Without early stopping there is no best epoch to load, and the message says so.
    train_run(None, tmp_path / "s", overrides=overrides[:-1] + ["train.epochs=1"], progress=False)
    with pytest.raises(PyrovaeError, match="only a run with early stopping"):
        load_run(tmp_path / "s", checkpoint="best")
    with pytest.raises(PyrovaeError, match="unknown checkpoint 'first'; valid: latest, best"):
        load_run(tmp_path / "r", checkpoint="first")


# --- how networks start: Glorot's and He's initializations, the data-mean output bias -------


def test_glorot_and_he_start_the_weights_with_their_variances():
    torch.manual_seed(0)
    glorot = nn.Linear(784, 200)
    initialize(glorot, "glorot")
    bound = (6 / (784 + 200)) ** 0.5
    assert glorot.weight.abs().max() <= bound and torch.all(glorot.bias == 0)
    # Uniform on +-bound has variance bound^2 / 3 = 2 / (fan_in + fan_out); 156,800 draws.
    assert abs(glorot.weight.var().item() / (2 / 984) - 1) < 0.02
    he = nn.Linear(784, 300)
    before = he.bias.clone()
    initialize(he, "he")
    assert abs(he.weight.var().item() / (2 / 784) - 1) < 0.02
    assert torch.equal(he.bias, before)  # biases as PyTorch starts them
    kept = nn.Linear(4, 3)
    weights = kept.weight.clone()
    initialize(kept, "torch")
    assert torch.equal(kept.weight, weights)
    with pytest.raises(ValueError, match="unknown init 'xavier'; valid: torch, glorot, he"):
        initialize(kept, "xavier")


def test_model_init_starts_every_network_but_not_a_flows_own_layers():
    base = [
        'guide.encoder={kind="flow", hidden=[16], flow_hidden=[8]}',
        "model.layers=[{latent_dim=2, hidden=[8]}]",
        "model.hierarchy='skip'",
    ]
    torch.manual_seed(0)
    plain = build(load_spec(None, base), 64, (8, 8))
    torch.manual_seed(0)
    glorot = build(load_spec(None, [*base, 'model.init="glorot"']), 64, (8, 8))
    for (model, guide), changed in ((plain, False), (glorot, True)):
        nets = [model.decoder.net, guide.encoder.net, model.layers[0].net, guide.layers[0].net]
        biases = [m.bias for net in nets for m in net.modules() if isinstance(m, nn.Linear)]
        assert all(torch.all(b == 0) for b in biases) == changed
    # The flow's transforms keep their own start (near the identity).
    for p, q in zip(
        plain[1].encoder.head.parameters(), glorot[1].encoder.head.parameters(), strict=True
    ):
        assert torch.equal(p, q)
    with pytest.raises(PyrovaeError, match="model.init must be one of torch, glorot, he"):
        load_spec(None, ['model.init="zeros"'])


def test_bias_from_data_starts_the_logits_at_the_data_mean_and_is_kept_by_a_run(tmp_path):
    x = torch.rand(50, 6).round()
    x[:, 0] = 0  # a constant pixel: the mean is clipped to 0.001
    likelihood = Bernoulli(bias_from_data=True, features=6)
    likelihood.initialize_from_data(x)
    mean = x.mean(0).clamp(0.001, 0.999)
    torch.testing.assert_close(torch.sigmoid(likelihood.bias), mean)
    logits = torch.randn(3, 6)
    expected = torch.distributions.Bernoulli(logits=logits + likelihood.bias).log_prob(x[:3])
    torch.testing.assert_close(likelihood(logits).log_prob(x[:3]), expected.sum(-1))
    with pytest.raises(ValueError, match="bias_from_data needs the number of features"):
        Bernoulli(bias_from_data=True)
    overrides = [
        "model.latent_dim=2",
        "model.decoder.hidden=[8]",
        "guide.encoder.hidden=[8]",
        'model.likelihood={kind="bernoulli", bias_from_data=true}',
        'data.binarize="dynamic"',
        "train.epochs=1",
        "data.limit=200",
    ]
    run = train_run(None, tmp_path / "r", overrides=overrides, progress=False)
    bias = run.model.likelihood.bias
    assert bias.abs().sum() > 0  # set from the training digits by fit
    torch.testing.assert_close(load_run(tmp_path / "r").model.likelihood.bias, bias)


# --- what early stopping follows for an importance-weighted objective ----------------------


def test_validation_reports_the_bound_an_importance_weighted_objective_trains():
    from pyro.infer.elbo import ELBOModule

    from pyrovae.inference.algorithms.objectives import elbo, iwae
    from pyrovae.inference.algorithms.scoring import score
    from pyrovae.inference.experiment.validation import monitored, validate

    torch.manual_seed(0)
    model, guide = small_pair()
    x = torch.rand(64, 16).round()
    plain = validate(elbo()(model, guide), x, 32, torch.device("cpu"))
    assert "validation_bound" not in plain and monitored(elbo()) == "validation_elbo"
    loss = iwae(5)(model, guide)
    assert isinstance(loss, ELBOModule) and monitored(loss) == "validation_bound"
    torch.manual_seed(1)
    values = validate(loss, x, 32, torch.device("cpu"))
    # The same draws by hand: one ELBO pass, then k = 5 unscaled particles per point.
    torch.manual_seed(1)
    first = score(model, guide, x, scaled=False)
    log_w = score(model, guide, x, num_particles=5, scaled=False).log_weight
    expected = (torch.logsumexp(log_w, 0) - torch.log(torch.tensor(5.0))).mean()
    assert values["validation_elbo"] == pytest.approx(first.log_weight.mean().item(), abs=1e-5)
    assert values["validation_bound"] == pytest.approx(expected.item(), abs=1e-5)
    # Tighter than the ELBO (fixed seed: 0.32 nats apart here; at least 0.1 asked).
    assert values["validation_bound"] > values["validation_elbo"] + 0.1
    # Without validation data the key is there, empty: training on the bound goes on.
    assert set(validate(loss, None, 32, torch.device("cpu"))) == set(values)
    history = fit(model, guide, x, epochs=1, objective=iwae(3))
    assert history[-1]["validation_bound"] != history[-1]["validation_bound"]  # NaN


@pytest.mark.parametrize(
    ("objective", "best", "stopped_at"),
    [
        ('{ kind = "iwae", num_particles = 2 }', 2, 4),  # the bound peaks at epoch 2
        ('{ kind = "elbo" }', 6, 6),  # the ELBO rises throughout
    ],
)
def test_early_stopping_and_the_best_epoch_follow_the_bound_an_iwae_run_trains(
    tmp_path, monkeypatch, objective, best, stopped_at
):
    from pyrovae.inference.experiment import training

    elbos = iter([-6.0, -5.0, -4.0, -3.0, -2.0, -1.0])
    bounds = iter([-5.0, -1.0, -2.0, -3.0, -4.0, -6.0])

    def scripted(loss_fn, x, batch_size, device):
        values = {"validation_elbo": next(elbos), "validation_reconstruction": 0.0,
                  "validation_kl": 0.0, "validation_active_units": 2.0}  # fmt: skip
        bound = next(bounds)
        if "iwae" in objective:
            values["validation_bound"] = bound
        return values

    monkeypatch.setattr(training, "validate", scripted)
    overrides = [
        "model.latent_dim=2",
        "model.decoder.hidden=[8]",
        "guide.encoder.hidden=[8]",
        "train.batch_size=512",
        "train.epochs=6",
        "train.patience=2",
        f"train.objective={objective}",
    ]
    run = train_run(None, tmp_path / "r", overrides=overrides, progress=False)
    assert run.epoch == stopped_at
    assert load_run(tmp_path / "r", checkpoint="best").epoch == best


def test_metrics_keep_a_column_that_a_resumed_run_adds(tmp_path):
    # A run resumed by a version whose validation reports one more value (the bound of an
    # IWAE run) writes every column, empty where an epoch has none.
    history = [
        {"epoch": 1, "validation_elbo": -3.0},
        {"epoch": 2, "validation_elbo": -2.0, "validation_bound": -1.5},
    ]
    Checkpoint(epoch=2, model={}, guide={}, history=history).save(tmp_path)
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows == ["epoch,validation_elbo,validation_bound", "1,-3.0,", "2,-2.0,-1.5"]
