"""Stacked stochastic layers: sites, the spec, a closed-form two-layer check, the CLI path."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch import nn
from torch.nn.functional import softplus

from pyrovae.guides import AmortizedGuide, TopDownGuide
from pyrovae.inference import (
    PyrovaeError,
    build,
    compare_runs,
    diagnose,
    evaluate_run,
    load_run,
    load_spec,
    log_marginal_likelihood,
    train_run,
    write_report,
)
from pyrovae.model import VAE, ConditionalNormal, Gaussian, StandardNormal, latent_sites

LAYER = "model.layers=[{latent_dim=3, hidden=[16]}]"


def test_site_names_are_z_for_one_layer_and_numbered_for_a_stack():
    assert latent_sites(1) == ("z",)
    assert latent_sites(3) == ("z1", "z2", "z3")
    with pytest.raises(ValueError):
        latent_sites(0)


def test_a_spec_with_layers_builds_a_top_down_model_and_a_bottom_up_guide():
    spec = load_spec(None, [LAYER, "model.latent_dim=5"])
    model, guide = build(spec, 64, (8, 8))
    x = torch.rand(7, 64)
    model_trace = pyro.poutine.trace(model).get_trace(x)
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    sample = [n for n, s in model_trace.nodes.items() if s["type"] == "sample" and n != "data"]
    assert sample == ["z2", "z1", "x"]  # prior on top, then down to the data
    assert [n for n in guide_trace.nodes if n.startswith("z")] == ["z1", "z2"]
    assert guide_trace.nodes["z1"]["value"].shape == (7, 5)
    assert guide_trace.nodes["z2"]["value"].shape == (7, 3)
    assert model.sample(4).shape == (4, 64)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.layers=[{latent_dim=0}]", r"model.layers\[0\].latent_dim must be"),
        ("model.layers=3", "must be a list of tables"),
        ("model.layers=[{latent_dim=2, depth=1}]", r"unknown spec key 'model.layers\[0\].depth'"),
    ],
)
def test_bad_layers_are_refused_by_name(override, message):
    with pytest.raises(PyrovaeError, match=message):
        load_spec(None, [override])


def test_a_vampprior_on_a_stack_is_refused_with_the_reason():
    spec = load_spec(None, [LAYER, 'model.prior={kind="vamp"}'])
    with pytest.raises(PyrovaeError, match="vamp.*model.layers"):
        build(spec, 64, (8, 8))


def test_bad_layer_sizes_are_one_error_naming_the_layer():
    spec = load_spec(None, ["model.layers=[{latent_dim=2, hidden=[0]}]"])
    with pytest.raises(PyrovaeError, match=r"model.layers\[0\]: hidden sizes"):
        build(spec, 64, (8, 8))


def _linear_normal(weight: torch.Tensor, bias: torch.Tensor, scale: float) -> ConditionalNormal:
    """A ConditionalNormal with loc = weight @ z + bias and a constant scale."""
    layer = ConditionalNormal(weight.shape[1], weight.shape[0], hidden=[])
    linear = layer.net[0]
    d = weight.shape[0]
    with torch.no_grad():
        linear.weight.zero_()
        linear.weight[:d] = weight
        linear.bias[:d] = bias
        raw = torch.tensor(scale - layer.min_scale, dtype=torch.float64)
        linear.bias[d:] = raw + torch.log(-torch.expm1(-raw))  # softplus^-1
    assert torch.allclose(softplus(linear.bias[d:]) + layer.min_scale, torch.tensor(scale))
    return layer


def _two_layer_gaussian():
    """z2 ~ N(0, 1), z1 | z2 ~ N(a z2 + b, s1^2), x | z1 ~ N(c z1 + d, s0^2 I_3); its exact
    posterior guide q(z1|x) q(z2|z1), and the closed-form marginal of x."""
    a, b, s1, s0 = 1.5, 0.3, 0.7, 0.4
    c, d = torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.1, 0.2, -0.3])
    decoder = nn.Linear(1, 3)
    with torch.no_grad():
        decoder.weight.copy_(c[:, None])
        decoder.bias.copy_(d)
    layer = _linear_normal(torch.tensor([[a]]), torch.tensor([b]), s1)
    model = VAE(StandardNormal(1), decoder, Gaussian(scale=s0), layers=[layer]).double()
    v1 = a**2 + s1**2  # the marginal variance of z1
    precision1 = 1 / v1 + c.square().sum() / s0**2  # of z1 given x
    encoder = _linear_normal(
        (c / (s0**2 * precision1))[None],
        ((b / v1 - c @ d / s0**2) / precision1)[None],
        float(precision1.rsqrt()),
    )
    precision2 = 1 + a**2 / s1**2  # of z2 given z1
    upper = _linear_normal(
        torch.tensor([[a / s1**2 / precision2]]),
        torch.tensor([-a * b / s1**2 / precision2]),
        precision2**-0.5,
    )
    guide = AmortizedGuide(encoder, layers=[upper]).double()
    marginal = torch.distributions.MultivariateNormal(
        (c * b + d).double(), (v1 * torch.outer(c, c) + s0**2 * torch.eye(3)).double()
    )
    return model, guide, marginal


def test_the_estimator_matches_a_two_layer_linear_gaussian_stack_in_closed_form():
    model, guide, marginal = _two_layer_gaussian()
    torch.manual_seed(0)
    x = marginal.sample((20,))
    exact = marginal.log_prob(x)
    # With the exact posterior as guide every log weight is log p(x): any wiring error
    # between the sites (a layer reading the wrong latent) would make them vary.
    result = log_marginal_likelihood(model, guide, x, num_samples=50)
    assert torch.allclose(result.log_px, exact, atol=1e-6)
    # A guide twice as wide is no longer exact; importance sampling still converges to it.
    with torch.no_grad():
        for layer in (guide.encoder, guide.layers[0]):
            raw = layer.net[0].bias[1:]
            wide = 2 * softplus(raw) + layer.min_scale
            raw.copy_(wide + torch.log(-torch.expm1(-wide)))  # softplus^-1
    pyro.set_rng_seed(0)
    widened = log_marginal_likelihood(model, guide, x, num_samples=20_000)
    assert (widened.log_px - exact).abs().max() < 0.02  # K = 20,000 draws, fixed seed


@pytest.fixture(scope="module")
def stacked_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("layers") / "run"
    return train_run(
        None,
        out,
        overrides=[LAYER, "train.epochs=1", "data.limit=300"],
        progress=False,
    )


def test_a_stacked_run_trains_round_trips_evaluates_and_reports(stacked_run):
    run = stacked_run
    assert run.model.latent_sites == ("z1", "z2")
    loaded = load_run(run.path)
    for (name, p), (_, q) in zip(
        run.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    first = evaluate_run(run, num_samples=20, limit=40, output=run.path / "a.json")
    again = evaluate_run(loaded, num_samples=20, limit=40, output=run.path / "b.json")
    assert torch.equal(first.result.log_px, again.result.log_px)  # seeded per block
    assert torch.isfinite(first.result.log_px).all()
    x = torch.rand(30, 64)
    diag = diagnose(run.model, run.guide, x, num_samples=0)
    assert set(diag.sites) == {"z1", "z2"} and diag.primary == "z1"  # what the decoder reads
    page = write_report(run.path, limit=40, num_samples=20)
    assert page.is_file() and "Latent space" in page.read_text()
    comparison = compare_runs([run.path, run.path], limit=30, num_samples=10)
    assert torch.equal(comparison.log_px[0], comparison.log_px[1])  # seeded alike: Δ is 0
    assert comparison.rows[1]["delta_log_px"] == 0


# --- the skip hierarchy: every latent reaches the decoder, the guide runs top-down ------------

SKIP = [
    "model.layers=[{latent_dim=3, hidden=[16], network='gated_mlp', activation='identity'}]",
    "model.latent_dim=5",
    "model.hierarchy='skip'",
]


def test_a_skip_stack_decodes_every_latent_and_its_guide_runs_top_down():
    spec = load_spec(None, SKIP)
    model, guide = build(spec, 64, (8, 8))
    x = torch.rand(7, 64)
    guide_trace = pyro.poutine.trace(guide).get_trace(x)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(x)
    assert [n for n in guide_trace.nodes if n.startswith("z")] == ["z2", "z1"]
    assert guide_trace.nodes["z1"]["value"].shape == (7, 5)
    assert guide_trace.nodes["z2"]["value"].shape == (7, 3)
    assert model.decoder_sites == ("z1", "z2")
    # The decoder reads [z1, z2]; q(z1 | x, z2) reads [x, z2].
    assert model.decoder.net[0].in_features == 5 + 3
    assert guide.layers[0].net[0].value.in_features == 64 + 3
    z1, z2 = (guide_trace.nodes[n]["value"] for n in ("z1", "z2"))
    expected = model.decode(torch.cat([z1, z2], -1)).log_prob(x)
    assert torch.allclose(model_trace.nodes["x"]["fn"].log_prob(x), expected)
    assert model.sample(4).shape == (4, 64)


def test_a_vampprior_on_a_skip_stack_uses_the_top_latents_encoder():
    spec = load_spec(None, [*SKIP, 'model.prior={kind="vamp", components=7}'])
    model, guide = build(spec, 64, (8, 8))
    assert model.prior.encoder is guide.encoder
    assert model.prior().event_shape == (3,)  # over z2, the top latent


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.hierarchy='ladder'"], "model.hierarchy must be one of chain, skip"),
        (["model.hierarchy='skip'"], "model.layers is empty"),
    ],
)
def test_a_bad_hierarchy_is_refused(overrides, message):
    with pytest.raises(PyrovaeError, match=message):
        load_spec(None, overrides)


def _skip_gaussian():
    """z2 ~ N(0, 1), z1 | z2 ~ N(a z2 + b, s1^2), x | z1, z2 ~ N(c z1 + e z2 + d, s0^2 I_3),
    with the guide q(z2|x) q(z1|x, z2) equal to the exact posterior, and the marginal of x."""
    a, b, s1, s0 = 1.5, 0.3, 0.7, 0.4
    c = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    e = torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64)
    d = torch.tensor([0.1, 0.2, -0.3], dtype=torch.float64)
    decoder = nn.Linear(2, 3).double()
    with torch.no_grad():
        decoder.weight.copy_(torch.stack([c, e], 1))
        decoder.bias.copy_(d)
    layer = _linear_normal(torch.tensor([[a]]), torch.tensor([b]), s1)
    model = VAE(StandardNormal(1), decoder, Gaussian(scale=s0), layers=[layer], skip=True).double()
    # x = (a c + e) z2 + c eps1 + (b c + d) + s0 eps0 with eps1 ~ N(0, s1^2).
    g = a * c + e
    mean = b * c + d
    cov = torch.outer(g, g) + s1**2 * torch.outer(c, c) + s0**2 * torch.eye(3, dtype=torch.float64)
    marginal = torch.distributions.MultivariateNormal(mean, cov)
    # q(z2 | x): Gaussian regression of z2 on x, loc = g' cov^-1 (x - mean), var 1 - g' cov^-1 g.
    gain2 = torch.linalg.solve(cov, g)
    encoder = _linear_normal(gain2[None], (-gain2 @ mean)[None], float((1 - g @ gain2).sqrt()))
    # q(z1 | x, z2): z1 = a z2 + b + eps1, and x - e z2 - d - c (a z2 + b) = c eps1 + s0 eps0.
    precision1 = 1 / s1**2 + c.square().sum() / s0**2
    w_x = c / s0**2 / precision1  # on x
    w_z2 = a - (c @ (e + a * c)) / s0**2 / precision1  # on z2
    bias1 = b - (c @ (d + b * c)) / s0**2 / precision1
    lower = _linear_normal(
        torch.cat([w_x, w_z2[None]])[None], bias1[None], float(precision1.rsqrt())
    )
    guide = TopDownGuide(encoder, [lower]).double()
    return model, guide, marginal


def test_the_estimator_matches_a_skip_linear_gaussian_stack_in_closed_form():
    model, guide, marginal = _skip_gaussian()
    torch.manual_seed(0)
    x = marginal.sample((20,))
    exact = marginal.log_prob(x)
    # The exact posterior as guide makes every log weight log p(x): a decoder that missed
    # z2, or a q(z1|.) that read the wrong inputs, would make the weights vary.
    result = log_marginal_likelihood(model, guide, x, num_samples=50)
    assert torch.allclose(result.log_px, exact, atol=1e-6)


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("skip") / "run"
    overrides = [
        *SKIP,
        'model.prior={kind="vamp", components=5}',
        "train.epochs=1",
        "data.limit=300",
    ]
    return train_run(None, out, overrides=overrides, progress=False)


def test_a_skip_run_trains_round_trips_evaluates_and_reports(skip_run):
    run = skip_run
    loaded = load_run(run.path)
    for (name, p), (_, q) in zip(
        run.model.state_dict().items(), loaded.model.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name
    first = evaluate_run(loaded, num_samples=20, limit=40, output=run.path / "a.json")
    assert torch.isfinite(first.result.log_px).all()
    page = write_report(run.path, limit=40, num_samples=20)
    assert page.is_file()
