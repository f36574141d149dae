"""Contract tests over every entry of ``PRIORS``, ``ENCODERS``, ``DECODERS`` and ``LIKELIHOODS``.

Cases are generated from the registries, so a new entry is tested without touching this file.
Each case builds a whole VAE and guide with that entry and the default entry of every other
family, injecting context arguments by signature as ``inference/spec.py`` does; data are
scikit-learn's 8x8 digits, quantized to 8-bit levels so that every likelihood accepts them.
"""

from __future__ import annotations

import io
import math

import pyro.distributions as pyro_dist
import pytest
import torch
import zuko
from pyro.infer import Trace_ELBO
from sklearn.datasets import load_digits
from torch import Tensor, nn

from pyrovae.guides import ENCODERS, AmortizedGuide
from pyrovae.inference.experiment.build import schema
from pyrovae.model import DECODERS, LIKELIHOODS, PRIORS, VAE, priors

REGISTRIES = {"prior": PRIORS, "encoder": ENCODERS, "decoder": DECODERS, "likelihood": LIKELIHOODS}
DEFAULTS = {
    "prior": "standard_normal",
    "encoder": "diagonal_normal",
    "decoder": "feedforward",
    "likelihood": "bernoulli",
}
CONTEXT_NAMES = {"latent_dim", "in_features", "out_features", "features", "image_shape", "encoder"}
SMALL = {"hidden": (16,), "flow_hidden": (16,), "context_features": 8, "components": 4}
"""Small sizes for the options a constructor takes, unless a case sets them."""

VARIANTS = [
    ("prior", "flow", {"flow": "nsf"}),
    ("encoder", "flow", {"flow": "nsf"}),
    ("prior", "flow", {"passes": 2}),
    ("encoder", "flow", {"passes": 2}),
    ("prior", "vamp", {"clip": True}),
    ("encoder", "diagonal_normal", {"network": "conv"}),
    ("encoder", "flow", {"network": "conv", "hidden": (4, 8)}),
    ("decoder", "feedforward", {"network": "conv", "hidden": (8, 4)}),
    ("encoder", "diagonal_normal", {"network": "gated_mlp", "activation": "identity"}),
    ("decoder", "feedforward", {"network": "gated_mlp", "activation": "identity"}),
    ("likelihood", "gaussian", {"learn_scale": True}),
    ("likelihood", "bernoulli", {"bias_from_data": True}),
    ("likelihood", "gaussian", {"learn_scale": True, "per_feature": True, "scale": 0.2}),
    ("likelihood", "laplace", {"learn_scale": True, "per_feature": True}),
]
"""Option combinations worth testing on top of every entry's defaults."""

IMAGE_SHAPE = (8, 8)
FEATURES = 64
P, B = 3, 5


def _id(case: tuple) -> str:
    family, name, options = case
    extra = ",".join(f"{k}={v}" for k, v in options.items()).replace(" ", "")
    return f"{family}:{name}" + (f"[{extra}]" if extra else "")


CASES = [(f, n, {}) for f, registry in REGISTRIES.items() for n in registry] + VARIANTS
ALL = [pytest.param(c, id=_id(c)) for c in CASES]


def by_family(*families: str) -> list:
    return [pytest.param(c, id=_id(c)) for c in CASES if c[0] in families]


def construct(constructor, options: dict, **context):
    """Calls ``constructor`` as the spec builder does: the options plus the context arguments
    its signature names (and ``SMALL`` sizes for options the case leaves unset)."""
    names = schema(constructor)
    small = {k: v for k, v in SMALL.items() if k in names and k not in options}
    injected = {k: v for k, v in context.items() if k in names}
    return constructor(**small, **options, **injected)


def build(
    case: tuple,
    latent_dim: int = 2,
    image_shape: tuple[int, ...] = IMAGE_SHAPE,
    defaults: dict[str, tuple[str, dict]] | None = None,
) -> tuple[VAE, AmortizedGuide]:
    """The VAE and guide with the case's entry and ``defaults`` elsewhere (``DEFAULTS``
    without options), in the builder's order, for data of ``image_shape``. The case's
    encoder or decoder takes the default's options where its constructor takes a network."""
    family, name, options = case
    defaults = defaults or {f: (entry, {}) for f, entry in DEFAULTS.items()}
    features = math.prod(image_shape)

    def part(f: str, **context):
        entry, opts = defaults[f]
        if f == family:
            entry, opts = name, dict(options)
            if "network" in schema(REGISTRIES[f][name]) and f in ("encoder", "decoder"):
                opts = {**defaults[f][1], **opts}
        return construct(REGISTRIES[f][entry], opts, **context)

    context = {
        "latent_dim": latent_dim,
        "features": features,
        "in_features": features,
        "image_shape": image_shape,
    }
    likelihood = part("likelihood", **context)
    encoder = part("encoder", **context)
    prior = part("prior", **context, encoder=encoder)
    out_features = features * getattr(likelihood, "num_params", 1)
    decoder = part("decoder", **context, out_features=out_features)
    return VAE(prior, decoder, likelihood), AmortizedGuide(encoder)


def component(case: tuple, vae: VAE, guide: AmortizedGuide) -> nn.Module:
    return {
        "prior": vae.prior,
        "encoder": guide.encoder,
        "decoder": vae.decoder,
        "likelihood": vae.likelihood,
    }[case[0]]


@pytest.fixture(scope="module")
def digits() -> Tensor:
    """The 1797 digits as (N, 64) grey levels k / 255."""
    x = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16
    return (x * 255).round() / 255


def elbo_loss(vae: VAE, guide: AmortizedGuide, num_particles: int = 1) -> nn.Module:
    return Trace_ELBO(
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=1,
    )(vae, guide)


# --- the registries and the builder's contract ------------------------------------------


@pytest.mark.parametrize(
    "family, name", [(f, n) for f, registry in REGISTRIES.items() for n in registry]
)
def test_signature_is_a_schema(family: str, name: str):
    """Every option is a real keyword with a default; the entry builds from context alone."""
    constructor = REGISTRIES[family][name]
    parameters = schema(constructor).values()
    options = [p for p in parameters if p.name not in CONTEXT_NAMES]
    assert all(p.default is not p.empty for p in options), "options need defaults"
    encoder = ENCODERS[DEFAULTS["encoder"]](in_features=FEATURES, latent_dim=2)
    context = {
        "latent_dim": 2,
        "features": FEATURES,
        "in_features": FEATURES,
        "out_features": 2 * FEATURES,
        "image_shape": IMAGE_SHAPE,
        "encoder": encoder,
    }
    names = {p.name for p in parameters}
    assert isinstance(constructor(**{k: v for k, v in context.items() if k in names}), nn.Module)


def test_public_names():
    from pyrovae.guides import AmortizedGuide, DiagonalNormal  # noqa: F401
    from pyrovae.model import Bernoulli, Decoder, Gaussian, StandardNormal  # noqa: F401

    assert {"standard_normal", "learned_normal", "mixture", "vamp", "flow"} <= set(PRIORS)
    assert {"diagonal_normal", "full_covariance_normal", "low_rank_normal", "flow"} <= set(ENCODERS)
    assert {"feedforward"} <= set(DECODERS)
    assert {"bernoulli", "gaussian", "continuous_bernoulli", "laplace"} <= set(LIKELIHOODS)


# --- shapes ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", by_family("prior"))
def test_prior_shapes(case: tuple):
    prior = build(case, latent_dim=3)[0].prior
    d = prior()
    assert d.event_shape == (3,) and d.batch_shape == ()
    z = d.expand(torch.Size([P, B]))()
    assert z.shape == (P, B, 3)
    log_p = d.log_prob(z)
    assert log_p.shape == (P, B) and torch.isfinite(log_p).all()


@pytest.mark.parametrize("case", by_family("encoder"))
def test_encoder_shapes_and_cached_density(case: tuple, digits: Tensor):
    encoder = build(case, latent_dim=3)[1].encoder
    x = digits[:B]
    d = encoder(x)
    assert d.event_shape == (3,) and d.batch_shape == (B,)
    assert d().shape == (B, 3)
    expanded = d.expand(torch.Size([P, B]))
    z = expanded()
    assert z.shape == (P, B, 3)
    log_q = expanded.log_prob(z)
    assert log_q.shape == (P, B) and torch.isfinite(log_q).all()
    # A flow caches the density of its own samples; it must equal a fresh evaluation.
    fresh = encoder(x).expand(torch.Size([P, B])).log_prob(z.detach().clone())
    torch.testing.assert_close(log_q, fresh, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", by_family("decoder"))
def test_decoder_shapes(case: tuple):
    vae, _ = build(case, latent_dim=3)
    out_features = FEATURES * getattr(vae.likelihood, "num_params", 1)
    z = torch.randn(P, B, 3)
    out = vae.decoder(z)
    assert out.shape == (P, B, out_features)
    torch.testing.assert_close(vae.decoder(z[1]), out[1])
    assert vae.decoder(z[0, 0]).shape == (out_features,)


@pytest.mark.parametrize("case", by_family("likelihood"))
def test_likelihood_shapes(case: tuple, digits: Tensor):
    likelihood = build(case)[0].likelihood
    num_params = getattr(likelihood, "num_params", 1)
    d = likelihood(torch.randn(P, B, FEATURES * num_params))
    assert d.event_shape == (FEATURES,) and d.batch_shape == (P, B)
    log_p = d.log_prob(digits[:B])
    assert log_p.shape == (P, B) and torch.isfinite(log_p).all()
    assert d.sample().shape == (P, B, FEATURES)
    assert likelihood.support.check(digits).all()


# --- gradients, save/load, training ------------------------------------------------------


@pytest.mark.parametrize("case", ALL)
def test_every_parameter_gets_a_gradient(case: tuple, digits: Tensor):
    vae, guide = build(case)
    elbo_loss(vae, guide, num_particles=2)(digits[:32]).backward()
    for name, p in nn.ModuleList([vae, guide]).named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def _outputs(case: tuple, module: nn.Module, digits: Tensor) -> list[Tensor]:
    generator = torch.Generator().manual_seed(5)
    x = digits[:B]
    with torch.no_grad():
        if case[0] == "prior":
            return [module().log_prob(torch.randn(P, B, 2, generator=generator))]
        if case[0] == "encoder":
            d = module(x)
            log_q = d.log_prob(torch.randn(P, B, 2, generator=generator))
            torch.manual_seed(9)
            return [log_q, d()]
        if case[0] == "decoder":
            return [module(torch.randn(P, B, 2, generator=generator))]
        params = torch.randn(P, B, FEATURES * getattr(module, "num_params", 1), generator=generator)
        return [module(params).log_prob(x)]


@pytest.mark.parametrize("case", ALL)
def test_save_load_round_trip(case: tuple, digits: Tensor):
    saved = component(case, *build(case))
    with torch.no_grad():  # as if trained: parameters away from any fixed initial value
        for p in saved.parameters():
            p.add_(0.1 * torch.randn_like(p))
    torch.manual_seed(1)
    fresh = component(case, *build(case))
    before = _outputs(case, fresh, digits)
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    after, expected = _outputs(case, fresh, digits), _outputs(case, saved, digits)
    for a, e in zip(after, expected, strict=True):
        assert torch.equal(a, e)
    if any(True for _ in saved.parameters()):
        assert not all(torch.equal(b, e) for b, e in zip(before, expected, strict=True))


@pytest.mark.parametrize("case", ALL)
def test_one_epoch_on_digits(case: tuple, digits: Tensor):
    vae, guide = build(case)
    loss_fn = elbo_loss(vae, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=3e-3)

    def evaluate() -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            return loss_fn(digits).item() / len(digits)

    before = evaluate()
    for batch in digits[torch.randperm(len(digits))].split(128):
        optimizer.zero_grad()
        loss_fn(batch).backward()
        optimizer.step()
    after = evaluate()
    assert math.isfinite(after)
    assert after < before


# --- densities: normalization and change of variables -----------------------------------


def _grid_integral(log_density, latent_dim: int, radius: float = 10.0) -> float:
    """The integral of ``exp(log_density(z))`` over ``[-radius, radius]^latent_dim``."""
    n = {1: 20001, 2: 301}[latent_dim]
    axis = torch.linspace(-radius, radius, n, dtype=torch.float64)
    grid = torch.cartesian_prod(*[axis] * latent_dim).reshape(-1, latent_dim)
    with torch.no_grad():
        density = log_density(grid).exp().reshape((n,) * latent_dim)
    for _ in range(latent_dim):
        density = torch.trapezoid(density, axis, dim=-1)
    return density.item()


@pytest.mark.parametrize("latent_dim", [1, 2])
@pytest.mark.parametrize("case", by_family("prior", "encoder"))
def test_density_integrates_to_one(case: tuple, latent_dim: int, digits: Tensor):
    vae, guide = build(case, latent_dim=latent_dim)
    vae.double(), guide.double()
    if case[0] == "prior":
        d = vae.prior()
        total = _grid_integral(d.log_prob, latent_dim)
    else:
        d = guide.encoder(digits[:1].double())
        total = _grid_integral(lambda z: d.log_prob(z[:, None, :])[:, 0], latent_dim)
    assert abs(total - 1) < 2e-3


LIKELIHOOD_DOMAINS = {
    "bernoulli": ("sum", torch.tensor([0.0, 1.0])),
    "discretized_logistic": ("sum", torch.linspace(0, 1, 256)),
    "discretized_logistic_mixture": ("sum", torch.linspace(0, 1, 256)),
    "continuous_bernoulli": ("integral", torch.linspace(0, 1, 20001)),
    "gaussian": ("integral", torch.linspace(-40, 40, 200001)),
    "heteroscedastic_gaussian": ("integral", torch.linspace(-40, 40, 200001)),
    "laplace": ("integral", torch.linspace(-40, 40, 200001)),
}


@pytest.mark.parametrize("case", by_family("likelihood"))
def test_likelihood_normalizes(case: tuple):
    _, name, options = case
    assert name in LIKELIHOOD_DOMAINS, f"add the domain of {name!r} to LIKELIHOOD_DOMAINS"
    likelihood = construct(LIKELIHOODS[name], options, features=1).double()
    num_params = getattr(likelihood, "num_params", 1)
    kind, values = LIKELIHOOD_DOMAINS[name]
    values = values.double()
    params = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64).T.repeat(1, num_params)
    with torch.no_grad():
        p = likelihood(params).log_prob(values[:, None, None]).exp()  # (N, 3)
    total = p.sum(0) if kind == "sum" else torch.trapezoid(p, values, dim=0)
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64), atol=1e-3, rtol=0)


FLOW_CASES = [
    ("prior", "flow", {}),
    ("prior", "flow", {"flow": "nsf"}),
    ("encoder", "flow", {}),
    ("encoder", "flow", {"flow": "nsf"}),
    ("prior", "flow", {"passes": 2}),
    ("encoder", "flow", {"passes": 2}),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in FLOW_CASES])
def test_flow_log_det_matches_jacobian(case: tuple, digits: Tensor):
    vae, guide = build(case, latent_dim=3)
    vae.double(), guide.double()
    d = vae.prior() if case[0] == "prior" else guide.encoder(digits[:1].double())
    transform = d.dist.transform  # z -> base; the wrapped zuko NormalizingFlow's
    z = torch.randn(1, 3, dtype=torch.float64)
    y, ladj = transform.call_and_ladj(z)
    jacobian = torch.autograd.functional.jacobian(lambda v: transform(v[None])[0], z[0])
    torch.testing.assert_close(ladj.reshape(()), torch.linalg.slogdet(jacobian).logabsdet)
    x, inverse_ladj = transform.inv.call_and_ladj(y)
    torch.testing.assert_close(x, z)
    torch.testing.assert_close(inverse_ladj, -ladj)


@pytest.mark.parametrize("num_particles", [1, 3])
@pytest.mark.parametrize("flow", ["maf", "nsf"])
def test_flow_guide_scores_its_samples_in_the_sampling_pass(
    flow: str, num_particles: int, digits: Tensor, monkeypatch: pytest.MonkeyPatch
):
    """Within the ELBO, log q(z|x) comes from ZukoToPyro's cache, never the sequential pass."""
    vae, guide = build(("encoder", "flow", {"flow": flow}))
    calls = []
    original = zuko.distributions.NormalizingFlow.log_prob
    monkeypatch.setattr(
        zuko.distributions.NormalizingFlow,
        "log_prob",
        lambda self, x: calls.append(x.shape) or original(self, x),
    )
    loss = elbo_loss(vae, guide, num_particles)(digits[:B])
    assert torch.isfinite(loss) and calls == []


@pytest.mark.parametrize("family", ["prior", "encoder"])
@pytest.mark.parametrize("passes", [None, 2, 3])
def test_a_flow_takes_its_passes_in_the_sequential_direction(
    family: str, passes: int | None, digits: Tensor
):
    """With 6 latent dimensions, each transform's masked network runs ``passes`` times (6 when
    fully autoregressive) where the flow is sequential, once where it is cheap: sampling for
    the prior (a MAF), scoring other points for the guide (an IAF); the sequential direction
    inverts the cheap one."""
    options = {} if passes is None else {"passes": passes}
    vae, guide = build((family, "flow", options), latent_dim=6)
    vae.double(), guide.double()
    module = vae.prior if family == "prior" else guide.encoder
    calls = []
    hypers = [m.hyper for m in module.modules() if hasattr(m, "hyper")]
    for hyper in hypers:
        hyper.register_forward_hook(lambda *_: calls.append(1))
    d = vae.prior() if family == "prior" else guide.encoder(digits[:4].double())
    z = torch.randn((4, 6), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        calls.clear()
        log_p = d.log_prob(z)
        scoring = len(calls)
        calls.clear()
        draws = d.dist.rsample()
        sampling = len(calls)
        torch.testing.assert_close(d.dist.transform.inv(d.dist.transform(draws)), draws)
    sequential, cheap = (sampling, scoring) if family == "prior" else (scoring, sampling)
    # The guide's score takes one more pass per transform, for the log-determinant at the
    # solution; the prior's draws need none.
    extra = 3 if family == "encoder" else 0
    assert len(hypers) == 3 and torch.isfinite(log_p).all()
    assert (sequential, cheap) == (3 * (passes or 6) + extra, 3)


# --- the VampPrior with every encoder ------------------------------------------------------

VAMP_ENCODERS = [pytest.param(n, {}, id=n) for n in ENCODERS] + [
    pytest.param("flow", {"flow": "nsf"}, id="flow[flow=nsf]"),
    pytest.param("flow", {"passes": 2}, id="flow[passes=2]"),
]
"""Every encoder as the VampPrior's components, flows (IAF and NSF) included."""


def vamp(name: str, options: dict, latent_dim: int = 2) -> tuple[VAE, AmortizedGuide]:
    """A VAE with a VampPrior over the ``name`` encoder, and the guide sharing that encoder."""
    context = {"in_features": FEATURES, "latent_dim": latent_dim, "image_shape": IMAGE_SHAPE}
    encoder = construct(ENCODERS[name], options, **context)
    prior = construct(PRIORS["vamp"], {}, **context, encoder=encoder)
    decoder = construct(DECODERS["feedforward"], {}, **context, out_features=FEATURES)
    return VAE(prior, decoder, LIKELIHOODS["bernoulli"]()), AmortizedGuide(encoder)


@pytest.mark.parametrize("name, options", VAMP_ENCODERS)
def test_vamp_prior_is_the_equal_mixture_of_its_components(name: str, options: dict):
    """log p(z) of P x B points against K separate encoder calls, one pseudo-input each."""
    vae, _ = vamp(name, options)
    vae.double()
    prior = vae.prior
    z = torch.randn(P, B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        log_q = torch.stack(
            [prior.encoder(u[None]).log_prob(z[..., None, :])[..., 0] for u in prior.pseudo_inputs],
            -1,
        )
        expected = log_q.exp().mean(-1).log()
        d = prior()
        assert d.batch_shape == () and d.event_shape == (2,)
        torch.testing.assert_close(d.log_prob(z), expected, rtol=1e-9, atol=1e-9)
        # Pyro's plates expand the prior; particles add a dim on the left.
        torch.testing.assert_close(
            d.expand(torch.Size([P, B])).log_prob(z), expected, rtol=1e-9, atol=1e-9
        )


def test_a_clipped_vamp_prior_is_the_prior_of_its_pseudo_inputs_clipped_to_the_unit_interval():
    """``clip``: u clipped to [0, 1] before the encoder, as Tomczak and Welling's code; entries
    outside [0, 1] get no gradient, those inside and those exactly at 0 or 1 do (pseudo-inputs
    that start as training digits are mostly 0 or 1, and must not be frozen there)."""
    context = {"in_features": FEATURES, "latent_dim": 2}
    encoder = construct(ENCODERS["diagonal_normal"], {}, **context)
    clipped = PRIORS["vamp"](**context, encoder=encoder, components=6, clip=True)
    plain = PRIORS["vamp"](**context, encoder=encoder, components=6)
    clipped.double(), plain.double()
    with torch.no_grad():
        clipped.pseudo_inputs.copy_(1.5 * torch.randn(6, FEATURES, dtype=torch.float64) + 0.5)
        plain.pseudo_inputs.copy_(clipped.pseudo_inputs.clamp(0, 1))
    z = torch.randn(B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    log_p = clipped().log_prob(z)
    torch.testing.assert_close(log_p, plain().log_prob(z), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(log_p.sum(), clipped.pseudo_inputs)
    outside = (clipped.pseudo_inputs < 0) | (clipped.pseudo_inputs > 1)
    assert outside.any() and (grad[outside] == 0).all() and (grad[~outside] != 0).any()
    with torch.no_grad():
        clipped.pseudo_inputs.copy_(torch.randint(2, (6, FEATURES), dtype=torch.float64))
    (grad,) = torch.autograd.grad(clipped().log_prob(z).sum(), clipped.pseudo_inputs)
    assert (grad != 0).float().mean() > 0.9
    with pytest.raises(ValueError, match="clip must be true or false"):
        PRIORS["vamp"](**context, encoder=encoder, clip="yes")


def test_vamp_prior_with_a_diagonal_encoder_matches_the_gaussian_formula():
    """The mixture density written out: (1/K) sum_k prod_i N(z_i; loc_ki, scale_ki)."""
    vae, _ = vamp("diagonal_normal", {})
    vae.double()
    prior = vae.prior
    z = torch.randn(P, B, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        components = prior.encoder(prior.pseudo_inputs).base_dist
        loc, scale = components.loc, components.scale  # (K, 2)
        u = (z[..., None, :] - loc) / scale
        log_normal = -0.5 * u**2 - scale.log() - 0.5 * math.log(2 * math.pi)
        expected = torch.log(log_normal.sum(-1).exp().mean(-1))
        assert priors._is_diagonal_normal(prior().components)
        torch.testing.assert_close(prior().log_prob(z), expected, rtol=1e-10, atol=1e-10)


def _hard_gaussian_mixture(dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """K = 7 components over 5 dimensions with scales from 1e-4 to 3 and locations of size 3,
    and values near the components (within a few scales) and far from them (N(0, 3^2))."""
    g = torch.Generator().manual_seed(11)
    loc = 3 * torch.randn(7, 5, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.empty(7, 5, dtype=torch.float64).uniform_(-9.2, 1.1, generator=g))
    pick = torch.randint(7, (4, 30), generator=g)
    near = loc[pick] + scale[pick] * torch.randn(4, 30, 5, generator=g, dtype=torch.float64)
    far = 3 * torch.randn(4, 10, 5, generator=g, dtype=torch.float64)
    return torch.cat([near, far], 1).to(dtype), loc.to(dtype), scale.to(dtype)


def _mixture_same_family(loc: Tensor, scale: Tensor) -> torch.distributions.Distribution:
    """The same mixture as Pyro builds it: the reference for UniformMixture's Gaussian path."""
    weights = pyro_dist.Categorical(logits=torch.zeros(len(loc), dtype=loc.dtype))
    return pyro_dist.MixtureSameFamily(weights, pyro_dist.Normal(loc, scale).to_event(1))


def test_gaussian_uniform_mixture_matches_pyros_mixture_in_value_and_gradient():
    """Diagonal Gaussian components take the matrix-product path: its log densities and their
    gradients with respect to z, loc and scale agree with Pyro's MixtureSameFamily in double
    precision, over scales from 2e-4 to 3 and values near the components and far from them
    (log densities from +14 to -1.3e6): within 1e-6 nats (the expansion's cancellation, about
    1e-16 (z / s)^2, was 9e-8 here) and 1e-7 of the largest gradient."""
    z, loc, scale = (t.requires_grad_() for t in _hard_gaussian_mixture(torch.float64))
    ours = priors.UniformMixture(pyro_dist.Normal(loc, scale).to_event(1)).log_prob(z)
    theirs = _mixture_same_family(loc, scale).log_prob(z)
    assert ours.shape == theirs.shape == (4, 40)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    for a, b in zip(
        torch.autograd.grad(ours.sum(), (z, loc, scale)),
        torch.autograd.grad(theirs.sum(), (z, loc, scale)),
        strict=True,
    ):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7 * b.abs().max().item())


def test_gaussian_uniform_mixture_in_single_precision_keeps_single_precision_accuracy():
    """From float32 inputs the log densities come back as float32 within 1e-6 relative (and
    1e-5 nats) of the double-precision reference on the same inputs: only the output's
    rounding. Written out in float32, the matrix product's expansion of the squared
    distances would lose about 1e-7 (z / s)^2, here more than 20."""
    z, loc, scale = _hard_gaussian_mixture(torch.float32)
    ours = priors.UniformMixture(pyro_dist.Normal(loc, scale).to_event(1)).log_prob(z)
    truth = _mixture_same_family(loc.double(), scale.double()).log_prob(z.double())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), truth, rtol=1e-6, atol=1e-5)
    precision = scale.pow(-2)
    single = (
        z.square() @ precision.T - 2 * z @ (loc * precision).T + (loc.square() * precision).sum(-1)
    )
    exact = ((z.double()[..., None, :] - loc.double()) / scale.double()).square().sum(-1)
    assert (single.double() - exact).abs().max() > 20


def test_gaussian_uniform_mixture_rejects_values_of_another_dimension():
    """Without validation as well: values of 10 = 2 x 5 numbers must not be read as two rows."""
    z, loc, scale = _hard_gaussian_mixture(torch.float64)
    mixture = priors.UniformMixture(pyro_dist.Normal(loc, scale).to_event(1), validate_args=False)
    with pytest.raises(ValueError, match=r"event shape \(5,\); got shape \(3, 10\)"):
        mixture.log_prob(z.reshape(4, 40 * 5)[:3, :10])


def test_gaussian_uniform_mixture_scores_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch):
    """With at most 14 (value, component) pairs of 5 dimensions at a time and K = 7, the
    matrix-product path takes 10 values per chunk, with the same log densities as in one."""
    z, loc, scale = _hard_gaussian_mixture(torch.float64)
    mixture = priors.UniformMixture(pyro_dist.Normal(loc, scale).to_event(1))
    whole = mixture.log_prob(z)
    sizes, inner = [], priors._gaussian_mixture_log_prob

    def spy(part: Tensor, right: Tensor) -> Tensor:
        sizes.append(len(part))
        return inner(part, right)

    monkeypatch.setattr(priors, "_gaussian_mixture_log_prob", spy)
    monkeypatch.setattr(priors, "MAX_COMPONENT_PAIRS", 14)
    chunked = mixture.log_prob(z)
    assert sizes == [10] * 16
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)


@pytest.mark.parametrize("name, options", VAMP_ENCODERS)
def test_vamp_prior_integrates_to_one(name: str, options: dict):
    vae, _ = vamp(name, options)
    vae.double()
    assert abs(_grid_integral(vae.prior().log_prob, 2) - 1) < 2e-3


@pytest.mark.parametrize("name, options", VAMP_ENCODERS)
def test_vamp_prior_samples_pick_components_uniformly(name: str, options: dict):
    """Mean and covariance of prior draws (expanded as in a plate) against those of the
    components' own draws pooled equally, 20,000 each; means within 5 standard errors,
    covariances within 5% + 0.02. Pseudo-inputs far apart make the components differ."""
    vae, _ = vamp(name, options)
    prior = vae.prior
    n, k = 20_000, len(prior.pseudo_inputs)
    torch.manual_seed(0)
    with torch.no_grad():
        prior.pseudo_inputs.copy_(10 * torch.randn(k, FEATURES))
        z = prior().expand(torch.Size([n // B, B]))().reshape(n, 2)
        pooled = prior.encoder(prior.pseudo_inputs).expand(torch.Size([n // k, k]))().reshape(n, 2)
        component_means = prior.encoder(prior.pseudo_inputs)(torch.Size([n // k])).mean(0)
    assert torch.isfinite(z).all()
    assert (component_means - component_means.mean(0)).norm(dim=-1).max() > 0.3
    stderr = (2 * pooled.var(0) / n).sqrt()
    torch.testing.assert_close(z.mean(0), pooled.mean(0), atol=5 * stderr.max().item(), rtol=0)
    torch.testing.assert_close(z.T.cov(), pooled.T.cov(), atol=0.02, rtol=0.05)


@pytest.mark.parametrize("name, options", VAMP_ENCODERS)
def test_vamp_prior_trains_with_every_encoder(name: str, options: dict, digits: Tensor):
    """Vectorized particles reach every parameter, pseudo-inputs included; training helps."""
    vae, guide = vamp(name, options)
    loss_fn = elbo_loss(vae, guide, num_particles=P)
    loss_fn(digits[:32]).backward()
    for param_name, p in loss_fn.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{param_name} has no gradient"
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=3e-3)

    def evaluate() -> float:
        torch.manual_seed(7)
        with torch.no_grad():
            return loss_fn(digits).item() / len(digits)

    before = evaluate()
    for batch in digits[torch.randperm(len(digits))].split(128):
        optimizer.zero_grad()
        loss_fn(batch).backward()
        optimizer.step()
    assert evaluate() < before


class _Spy:
    """A distribution that records how many values each call scores or draws."""

    def __init__(self, d: torch.distributions.Distribution, sizes: list[int]) -> None:
        self.d, self.sizes = d, sizes

    def __getattr__(self, name: str):
        return getattr(self.d, name)

    def log_prob(self, value: Tensor) -> Tensor:
        self.sizes.append(value.shape[:-2].numel())
        return self.d.log_prob(value)

    def __call__(self, sample_shape: torch.Size) -> Tensor:
        self.sizes.append(sample_shape.numel())
        return self.d(sample_shape)


@pytest.mark.parametrize("name, options", VAMP_ENCODERS)
def test_vamp_prior_scores_and_draws_in_bounded_chunks(
    name: str, options: dict, monkeypatch: pytest.MonkeyPatch
):
    """With at most 12 (value, component) pairs at a time, 3 values per chunk of K = 4: the
    same log densities as in one call, and draws of the same mixture (moments of 20,000
    against 20,000 drawn in one call, within 5 standard errors and 5% + 0.02)."""
    vae, _ = vamp(name, options)
    vae.double()
    z = torch.randn(7, 5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        vae.prior.pseudo_inputs.copy_(4 * torch.randn_like(vae.prior.pseudo_inputs))
        whole = vae.prior().log_prob(z)
        torch.manual_seed(0)
        one_call = vae.prior()(torch.Size([20_000]))
        monkeypatch.setattr(priors, "MAX_COMPONENT_PAIRS", 12)
        mixture, sizes = vae.prior(), []
        mixture.components = _Spy(mixture.components, sizes)
        chunked = mixture.log_prob(z)
        torch.manual_seed(1)
        draws = mixture(torch.Size([100, 200]))
    assert max(sizes) == 3 and sum(sizes) == 35 + 20_000
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    assert draws.shape == (100, 200, 2)
    draws = draws.reshape(-1, 2)
    stderr = (2 * one_call.var(0) / len(draws)).sqrt()
    torch.testing.assert_close(
        draws.mean(0), one_call.mean(0), atol=5 * stderr.max().item(), rtol=0
    )
    torch.testing.assert_close(draws.T.cov(), one_call.T.cov(), atol=0.02, rtol=0.05)


class _WrongBatchEncoder(nn.Module):
    def forward(self, x: Tensor) -> torch.distributions.Distribution:
        return torch.distributions.Independent(torch.distributions.Normal(torch.zeros(2), 1.0), 1)


def test_vamp_prior_rejects_an_encoder_without_a_batch_of_components():
    with pytest.raises(ValueError, match="batch shape") as error:
        PRIORS["vamp"](latent_dim=2, in_features=FEATURES, encoder=_WrongBatchEncoder())
    assert "\n" not in str(error.value)


# --- convolutional networks --------------------------------------------------------------


@pytest.mark.parametrize("image_shape", [(28, 28), (8, 8), (7, 5)])
@pytest.mark.parametrize("hidden", [(8,), (8, 4, 4)])
def test_conv_networks_fit_the_image(image_shape: tuple[int, int], hidden: tuple[int, ...]):
    pixels = image_shape[0] * image_shape[1]
    decoder = DECODERS["feedforward"](
        latent_dim=3,
        out_features=2 * pixels,
        image_shape=image_shape,
        hidden=hidden,
        network="conv",
    )
    assert decoder(torch.randn(P, B, 3)).shape == (P, B, 2 * pixels)
    encoder = ENCODERS["diagonal_normal"](
        in_features=pixels, latent_dim=3, hidden=hidden, network="conv", image_shape=image_shape
    )
    assert encoder(torch.rand(B, pixels)).batch_shape == (B,)


# --- colour images: C > 1 through every part ---------------------------------------------

COLOUR_SHAPE = (3, 6, 5)
COLOUR_FEATURES = math.prod(COLOUR_SHAPE)
COLOUR_DEFAULTS = {
    "prior": ("standard_normal", {}),
    "encoder": ("diagonal_normal", {"network": "conv", "hidden": (4, 8)}),
    "decoder": ("feedforward", {"network": "conv", "hidden": (8, 4)}),
    "likelihood": ("bernoulli", {}),
}
"""Convolutional networks on both sides, so that every case sees (C, H, W) images."""


COLOUR_CASES = [(f, n, {}) for f, registry in REGISTRIES.items() for n in registry]


@pytest.mark.parametrize("case", [pytest.param(c, id=_id(c)) for c in COLOUR_CASES])
def test_colour_images_through_every_part(case: tuple):
    """(3, 6, 5) images of 8-bit levels with conv networks: every entry scores them with
    finite values, every parameter gets a gradient, and samples and means have their shape."""
    vae, guide = build(case, image_shape=COLOUR_SHAPE, defaults=COLOUR_DEFAULTS)
    x = torch.randint(0, 256, (B, COLOUR_FEATURES), generator=torch.Generator().manual_seed(0))
    x = x.float() / 255
    assert guide.encoder(x).batch_shape == (B,)
    params = vae.decoder(torch.randn(P, B, 2))
    d = vae.likelihood(params)
    assert d.event_shape == (COLOUR_FEATURES,) and d.batch_shape == (P, B)
    log_p = d.log_prob(x)
    assert log_p.shape == (P, B) and torch.isfinite(log_p).all()
    assert d.sample().shape == (P, B, COLOUR_FEATURES)
    elbo_loss(vae, guide, num_particles=2)(x).backward()
    for param_name, p in nn.ModuleList([vae, guide]).named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{param_name} has no gradient"
    for mean in (True, False):
        assert vae.sample(4, mean=mean).shape == (4, COLOUR_FEATURES)


def test_conv_networks_keep_the_channels_apart():
    """The encoder reads (C, H, W) channel-major: a change in one value of one channel
    reaches the first convolution's output only through that channel's weights; the decoder
    lays out parameter j of channel c at block j, rows c."""
    encoder = ENCODERS["diagonal_normal"](
        in_features=COLOUR_FEATURES, latent_dim=2, network="conv", image_shape=COLOUR_SHAPE
    )
    first = encoder.net[1]
    assert isinstance(first, nn.Conv2d) and first.in_channels == 3
    unflatten = encoder.net[0]
    x = torch.arange(COLOUR_FEATURES, dtype=torch.float32)
    torch.testing.assert_close(unflatten(x), x.reshape(COLOUR_SHAPE))
    decoder = DECODERS["feedforward"](
        latent_dim=2,
        out_features=2 * COLOUR_FEATURES,
        network="conv",
        hidden=(4,),
        image_shape=COLOUR_SHAPE,
    )
    last = [m for m in decoder.modules() if isinstance(m, nn.ConvTranspose2d)][-1]
    assert last.out_channels == 6


# --- bad values ---------------------------------------------------------------------------

_ENC = {"in_features": FEATURES, "latent_dim": 2}
BAD = [
    ("prior", "standard_normal", {"latent_dim": 0}, "latent_dim"),
    ("prior", "mixture", {"latent_dim": 2, "components": 0}, "components"),
    ("prior", "vamp", {"latent_dim": 2, "in_features": FEATURES}, "encoder"),
    ("prior", "flow", {"latent_dim": 2, "transforms": 0}, "transforms"),
    ("prior", "flow", {"latent_dim": 2, "flow": "realnvp"}, "unknown flow"),
    ("prior", "flow", {"latent_dim": 2, "hidden": (0,)}, "hidden"),
    ("encoder", "flow", {**_ENC, "transforms": 0}, "transforms"),
    ("encoder", "flow", {**_ENC, "context_features": 0}, "context_features"),
    ("encoder", "flow", {**_ENC, "passes": 1}, "passes"),
    ("encoder", "flow", {**_ENC, "passes": 3}, "passes"),
    ("prior", "flow", {"latent_dim": 4, "passes": 2.5}, "passes"),
    ("prior", "flow", {"latent_dim": 4, "passes": "2"}, "passes"),
    ("prior", "flow", {"latent_dim": 4, "passes": float("inf")}, "passes"),
    ("prior", "flow", {"latent_dim": 4, "transforms": "3"}, "transforms"),
    ("encoder", "low_rank_normal", {**_ENC, "rank": 0}, "rank"),
    ("encoder", "low_rank_normal", {**_ENC, "rank": 3}, "rank"),
    ("encoder", "diagonal_normal", {**_ENC, "network": "conv"}, "image_shape"),
    ("encoder", "diagonal_normal", {**_ENC, "network": "resnet"}, "unknown network"),
    ("encoder", "diagonal_normal", {**_ENC, "activation": "sigmoidal"}, "unknown activation"),
    ("encoder", "full_covariance_normal", {**_ENC, "min_scale": 0}, "min_scale"),
    (
        "encoder",
        "diagonal_normal",
        {**_ENC, "network": "conv", "image_shape": (7, 7)},
        "does not match",
    ),
    (
        "decoder",
        "feedforward",
        {"latent_dim": 2, "out_features": FEATURES, "network": "conv"},
        "image",
    ),
    (
        "decoder",
        "feedforward",
        {"latent_dim": 2, "out_features": 100, "image_shape": IMAGE_SHAPE, "network": "conv"},
        "multiple",
    ),
    (
        "decoder",
        "feedforward",
        {"latent_dim": 2, "out_features": FEATURES, "image_shape": IMAGE_SHAPE, "hidden": ()}
        | {"network": "conv"},
        "at least one",
    ),
    (
        "decoder",
        "feedforward",
        {"latent_dim": 2, "out_features": FEATURES, "hidden": (0,)},
        "hidden",
    ),
    ("likelihood", "gaussian", {"scale": 0.0}, "scale"),
    ("likelihood", "gaussian", {"per_feature": True, "features": FEATURES}, "learn_scale"),
    ("likelihood", "laplace", {"learn_scale": True, "per_feature": True}, "features"),
    ("likelihood", "heteroscedastic_gaussian", {"min_scale": -1.0}, "min_scale"),
    ("likelihood", "discretized_logistic", {"levels": 1}, "levels"),
    ("likelihood", "discretized_logistic_mixture", {"components": 0}, "components"),
    (
        "decoder",
        "feedforward",
        {"latent_dim": 2, "out_features": 3 * 64, "image_shape": (2, 8, 8), "network": "conv"},
        "multiple",
    ),
    (
        "encoder",
        "diagonal_normal",
        {**_ENC, "network": "conv", "image_shape": (2, 8, 8)},
        "does not match",
    ),
]


@pytest.mark.parametrize(
    "family, name, kwargs, match",
    [pytest.param(*b, id=f"{b[0]}:{b[1]}:{b[3]}") for b in BAD],
)
def test_bad_values_raise_one_line_value_errors(family: str, name: str, kwargs: dict, match: str):
    with pytest.raises(ValueError, match=match) as error:
        REGISTRIES[family][name](**kwargs)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", ALL)
def test_vae_generates_data(case: tuple):
    vae, _ = build(case)
    for mean in (True, False):
        x = vae.sample(4, mean=mean)
        assert x.shape == (4, FEATURES) and torch.isfinite(x).all()
