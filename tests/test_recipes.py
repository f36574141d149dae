"""Richer parts start where the simple ones are; learning-rate schedules; early stopping that
waits for KL warm-up; the collapse alarm."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.guides import (
    AmortizedGuide,
    DiagonalNormal,
    FlowEncoder,
    FullCovarianceNormal,
    LowRankNormal,
)
from pyrovae.inference import (
    BatchTransform,
    Checkpoint,
    CollapseAlarm,
    EarlyStopping,
    FitState,
    GradientClipping,
    GuideWarmup,
    LinearWarmup,
    fit,
    load_data,
    load_spec,
    train_run,
)
from pyrovae.inference.errors import PyrovaeError
from pyrovae.inference.experiment.build import build_lr_schedule
from pyrovae.inference.experiment.callbacks import Callback, collapse_message
from pyrovae.inference.experiment.recipes import adam, adamw, fused_supported
from pyrovae.inference.experiment.warmup import set_base_only
from pyrovae.model import (
    VAE,
    Bernoulli,
    Decoder,
    FlowPrior,
    Gaussian,
    MixtureOfNormals,
    StandardNormal,
    VampPrior,
)

D = 6


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "dynamic")


# --- initial states ---------------------------------------------------------------------------


def test_a_fresh_full_covariance_guide_is_nearly_diagonal(digits):
    q = FullCovarianceNormal(64, D, hidden=[32])(digits.train[:100])
    tril = q.scale_tril
    off = tril - torch.diag_embed(tril.diagonal(dim1=-2, dim2=-1))
    ratio = off.norm(dim=(-2, -1)) / tril.diagonal(dim1=-2, dim2=-1).norm(dim=-1)
    # 15 off-diagonal entries at about 1% of the diagonal ones' scale.
    assert ratio.max().item() < 0.05


def test_a_fresh_low_rank_guide_is_nearly_diagonal(digits):
    q = LowRankNormal(64, D, rank=2, hidden=[32])(digits.train[:100])
    assert (q.cov_factor.norm(dim=(-2, -1)) / q.cov_diag.sqrt().norm(dim=-1)).max() < 0.05


@pytest.mark.parametrize("flow", ["maf", "nsf"])
def test_a_fresh_flow_prior_is_nearly_the_standard_normal(flow):
    prior = FlowPrior(D, flow=flow)()
    z = torch.randn(500, D, generator=torch.Generator().manual_seed(0))
    standard = dist.Normal(0.0, 1.0).expand([D]).to_event(1).log_prob(z)
    # Last layers at 1% of their default scale: log densities within 0.1 nats.
    torch.testing.assert_close(prior.log_prob(z), standard, atol=0.1, rtol=0)


@pytest.mark.parametrize("flow", ["maf", "nsf"])
def test_a_fresh_flow_guide_is_nearly_its_diagonal_base(flow, digits):
    encoder = FlowEncoder(64, D, flow=flow, hidden=[32], context_features=8)
    x = digits.train[:50]
    q = encoder(x)
    z = q()  # ZukoToPyro draws through its call, as Pyro's sample statements do
    base = encoder.head.flow.base(encoder.net(x))
    torch.testing.assert_close(q.log_prob(z), base.log_prob(z), atol=0.1, rtol=0)


def test_a_fresh_mixture_prior_is_close_to_the_standard_normal():
    torch.manual_seed(0)
    prior = MixtureOfNormals(4, components=10)()
    z = torch.randn(1000, 4)
    standard = dist.Normal(0.0, 1.0).expand([4]).to_event(1).log_prob(z)
    # Means at 0.1 scale: the mixture is within a few hundredths of a nat on average.
    assert (prior.log_prob(z) - standard).abs().mean().item() < 0.05
    assert (
        torch.cdist(prior.component_distribution.mean, prior.component_distribution.mean).max() > 0
    )


def frozen(model, guide):
    """The parameters of model and guide, for an optimizer of learning rate 0."""
    return torch.nn.ModuleList([model, guide]).parameters()


def test_fit_starts_vamp_pseudo_inputs_and_a_learned_scale_from_the_data(digits):
    encoder = DiagonalNormal(64, D, hidden=[16])
    model = VAE(VampPrior(D, 64, encoder, components=5), Decoder(D, 64, [16]), Bernoulli())
    guide = AmortizedGuide(encoder)
    fit(model, guide, digits.train[:300], epochs=1, optimizer=adam(frozen(model, guide), 0.0))
    pseudo = model.prior.pseudo_inputs.detach()
    rows = (pseudo[:, None] == digits.train[:300][None]).all(-1).any(-1)
    assert rows.all()  # every pseudo-input is a training point

    grey = load_data("digits", "none").train
    likelihood = Gaussian(learn_scale=True, per_feature=True, features=64)
    model = VAE(StandardNormal(D), Decoder(D, 64, [16]), likelihood)
    guide = AmortizedGuide(DiagonalNormal(64, D, hidden=[16]))
    fit(model, guide, grey, epochs=1, optimizer=adam(frozen(model, guide), 0.0))
    expected = grey.std(0).clamp(min=0.01)
    torch.testing.assert_close(likelihood.log_scale.exp().detach(), expected)
    fixed = Gaussian(scale=0.3, learn_scale=True, scale_from_data=False)
    fixed.initialize_from_data(grey)
    assert fixed.log_scale.exp().item() == pytest.approx(0.3)


# --- guide warm-up ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fullcov", "lowrank", "flow"])
def test_a_richer_head_switched_to_its_base_is_the_diagonal_gaussian_of_its_loc_and_scales(
    kind, digits
):
    torch.manual_seed(0)
    x = digits.train[:20]
    if kind == "flow":
        encoder = FlowEncoder(64, D, hidden=[32], context_features=8)
        base = encoder.head.flow.base(encoder.net(x))
        loc, scale = base.mean, base.stddev
    else:
        cls = FullCovarianceNormal if kind == "fullcov" else LowRankNormal
        encoder = cls(64, D, hidden=[32])
        full = encoder(x)
        loc = full.loc
        scale = (
            full.scale_tril.diagonal(dim1=-2, dim2=-1)
            if kind == "fullcov"
            else full.cov_diag.sqrt()
        )
    assert set_base_only(encoder, True) == 1
    q = encoder(x)
    z = q()  # Pyro distributions (ZukoToPyro too) draw through their call
    expected = dist.Normal(loc, scale).to_event(1).log_prob(z)
    torch.testing.assert_close(q.log_prob(z), expected, rtol=1e-5, atol=1e-5)
    assert q.batch_shape == (20,) and q.event_shape == (D,)
    assert set_base_only(encoder, False) == 1
    assert set_base_only(DiagonalNormal(64, D, hidden=[32]), True) == 0


def test_a_guide_warm_up_trains_the_base_alone_and_hands_back_the_full_guide(digits):
    torch.manual_seed(0)
    encoder = FlowEncoder(64, D, hidden=[16], context_features=8)
    model = VAE(StandardNormal(D), Decoder(D, 64, [16]), Bernoulli())
    guide = AmortizedGuide(encoder)
    flow = {k: v.clone() for k, v in encoder.head.flow.transform.state_dict().items()}
    trunk = {k: v.clone() for k, v in encoder.net.state_dict().items()}
    seen = []

    class Watch(Callback):
        def on_step_end(self, state, step, loss):
            if step == 0:
                seen.append(encoder.head.base_only)

    fit(model, guide, digits.train[:256], epochs=2, batch_size=64,
        callbacks=[Watch(), GuideWarmup(2)])  # fmt: skip
    assert seen == [True, True] and not encoder.head.base_only
    for key, value in encoder.head.flow.transform.state_dict().items():
        torch.testing.assert_close(value, flow[key], rtol=0, atol=0)
    assert any(not torch.equal(v, trunk[k]) for k, v in encoder.net.state_dict().items())

    fit(model, guide, digits.train[:256], epochs=1, batch_size=64)
    moved = encoder.head.flow.transform.state_dict()
    assert any(not torch.equal(v, flow[k]) for k, v in moved.items())


def test_the_guide_warm_up_follows_the_epoch_and_the_spec_and_early_stopping_waits(tmp_path):
    warmup = GuideWarmup(2)
    guide = AmortizedGuide(FullCovarianceNormal(8, 2, hidden=[4]))
    state = FitState(None, guide, None, None, epochs=5, steps_per_epoch=1, batch_size=1)
    switched = []
    for epoch in (1, 2, 3, 2):  # the last: a run resumed inside its warm-up
        state.epoch = epoch
        warmup.on_epoch_start(state)
        switched.append(guide.encoder.head.base_only)
    assert switched == [True, True, False, True]
    warmup.on_fit_end(state)
    assert not guide.encoder.head.base_only
    with pytest.raises(PyrovaeError, match="an integer >= 1"):
        GuideWarmup(0)

    seen = []

    class Watch(Callback):
        """Records the switch, and makes every epoch's validation ELBO look worse than the last
        one's (-1, -2, ...: far above the real one until rewritten, after early stopping ran)."""

        def on_epoch_end(self, state):
            seen.append(state.guide.encoder.head.base_only)
            state.history[-1]["validation_elbo"] = -float(state.epoch)

    overrides = [
        "model.latent_dim=2",
        "model.decoder.hidden=[16]",
        "guide.encoder.hidden=[16]",
        'guide.encoder.kind="full_covariance_normal"',
        "train.batch_size=256",
        "train.epochs=3",
        "train.patience=1",
    ]
    run = train_run(
        None, tmp_path / "r", overrides=[*overrides, "train.guide_warmup=2"], progress=False,
        callbacks=[Watch()],
    )  # fmt: skip
    assert seen == [True, True, False]
    # Early stopping counts from the end of the warm-up; without it, patience 1 ends epoch 2.
    assert len(run.history) == 3
    seen.clear()
    run = train_run(None, tmp_path / "s", overrides=overrides, progress=False, callbacks=[Watch()])
    assert seen == [False, False] and len(run.history) == 2
    with pytest.raises(PyrovaeError, match="guide_warmup"):
        load_spec(None, ["train.guide_warmup=-1"])
    # A diagonal guide has nothing to warm up: refused before the run directory is made.
    with pytest.raises(PyrovaeError, match="nothing to hold back"):
        train_run(None, tmp_path / "t", overrides=["train.guide_warmup=2"], progress=False)
    assert not (tmp_path / "t").exists()
    with pytest.raises(PyrovaeError, match="nothing to hold back"):
        fit(VAE(StandardNormal(2), Decoder(2, 8, [4]), Bernoulli()),
            AmortizedGuide(DiagonalNormal(8, 2, hidden=[4])), torch.rand(16, 8).round(),
            callbacks=[GuideWarmup(1)])  # fmt: skip


# --- learning-rate schedules ----------------------------------------------------------------


def lrs(kind: str, epochs: int = 40, metric=None, **options) -> list[float]:
    """The learning rate of every epoch under a schedule built from the spec."""
    table = ", ".join(f"{k} = {v}" for k, v in {"kind": f'"{kind}"', **options}.items())
    spec = load_spec(None, [f"train.lr_schedule={{ {table} }}", f"train.epochs={epochs}"])
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=spec.train.lr)
    scheduler = build_lr_schedule(spec, optimizer)
    rates = []
    for epoch in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        if scheduler is None:
            continue
        optimizer.step()  # an epoch's steps come before the schedule's, as in fit
        if metric is None:
            scheduler.step()
        else:
            scheduler.step(metric(epoch))
    return rates


def test_learning_rate_schedules_give_the_intended_rate_per_epoch():
    assert lrs("constant") == [1e-3] * 40
    step = lrs("step", step_size=10, gamma=0.5)
    assert step[:10] == [1e-3] * 10 and step[10:20] == pytest.approx([5e-4] * 10)
    assert step[39] == pytest.approx(1.25e-4)
    # Burda et al.: stage i lasts 3^i epochs at 1e-3 * 10^(-i/7).
    burda = lrs("burda")
    stage = [0] + [1] * 3 + [2] * 9 + [3] * 27
    assert burda == pytest.approx([1e-3 * 10 ** (-i / 7) for i in stage])
    cosine = lrs("cosine", epochs=20)
    assert cosine[10] == pytest.approx(5e-4) and cosine[0] == 1e-3
    # A validation ELBO that stops improving at epoch 5: two epochs' patience, then halved.
    plateau = lrs("plateau", epochs=12, metric=lambda e: min(e, 5), patience=2)
    assert plateau[:9] == [1e-3] * 9 and plateau[9] == pytest.approx(5e-4)


def test_the_schedule_reaches_fit_and_resumes_exactly(tmp_path):
    overrides = [
        "model.latent_dim=2",
        "model.decoder.hidden=[16]",
        "guide.encoder.hidden=[16]",
        "train.batch_size=256",
        'train.lr_schedule={ kind = "step", step_size = 1, gamma = 0.5 }',
    ]
    run = train_run(None, tmp_path / "r", overrides=[*overrides, "train.epochs=2"], progress=False)
    assert [h["lr"] for h in run.history] == pytest.approx([1e-3, 5e-4])
    assert Checkpoint.load(tmp_path / "r").lr_scheduler["last_epoch"] == 2
    resumed = train_run(
        None, tmp_path / "r", overrides=["train.epochs=3"], resume=True, progress=False
    )
    assert [h["lr"] for h in resumed.history] == pytest.approx([1e-3, 5e-4, 2.5e-4])


# --- early stopping and the collapse alarm --------------------------------------------------


def history(values: list[float], kl: float = 5.0, active: float = 3.0) -> list[dict]:
    return [
        {
            "epoch": i + 1,
            "validation_elbo": v,
            "validation_kl": kl,
            "validation_active_units": active,
        }
        for i, v in enumerate(values)
    ]


def state_with(entries: list[dict]) -> FitState:
    return FitState(
        None, None, None, None, epochs=100, steps_per_epoch=1, batch_size=1, history=entries
    )


def test_early_stopping_waits_for_the_warm_up():
    # The ELBO falls while the KL weight rises for 4 epochs, then improves once and stalls.
    values = [-90, -95, -100, -104, -103, -104]
    waiting = EarlyStopping(patience=1, start_epoch=5)
    eager = EarlyStopping(patience=1)
    for n in range(1, len(values) + 1):
        state = state_with(history(values[:n]))
        waiting.on_epoch_end(state)
        if state.stop:
            break
    assert n == 6  # counted from epoch 5: best at 5, one bad epoch at 6
    state = state_with(history(values[:2]))
    eager.on_epoch_end(state)
    assert state.stop
    # Left to itself, early stopping counts from the end of the run's warm-ups.
    for warmup_epochs, stops_at in ((0, 2), (4, 6)):
        default = EarlyStopping(patience=1)
        for n in range(1, len(values) + 1):
            state = state_with(history(values[:n]))
            state.warmup_epochs = warmup_epochs
            default.on_epoch_end(state)
            if state.stop:
                break
        assert n == stops_at


def test_fit_counts_the_warm_ups_of_the_kl_schedule_and_of_the_guide(digits):
    """FitState.warmup_epochs is the longest warm-up: the KL schedule's steps in whole
    epochs, or a callback's (a guide warm-up), whichever callback comes first."""
    seen = {}

    class Record(Callback):
        def on_fit_start(self, state):
            seen["warmup"] = state.warmup_epochs

    x = digits.train[:256]  # 4 steps per epoch at batch size 64
    for schedule, callbacks, expected in (
        (None, [], 0),
        (LinearWarmup(warmup_steps=9), [], 3),
        (LinearWarmup(warmup_steps=4), [GuideWarmup(2)], 2),
    ):
        model = VAE(StandardNormal(D), Decoder(D, 64, [16]), Bernoulli())
        guide = AmortizedGuide(FullCovarianceNormal(64, D, hidden=[16]))
        fit(model, guide, x, epochs=1, batch_size=64, kl_schedule=schedule,
            callbacks=[Record(), *callbacks])  # fmt: skip
        assert seen["warmup"] == expected


def test_gradient_clipping_bounds_the_norm_the_optimizer_sees(digits):
    norms = []

    class Norm(Callback):
        def on_before_optimizer_step(self, state):
            grads = [p.grad for g in state.optimizer.param_groups for p in g["params"]]
            norms.append(
                torch.linalg.vector_norm(torch.stack([g.norm() for g in grads if g is not None]))
            )

    model = VAE(StandardNormal(D), Decoder(D, 64, [16]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(64, D, hidden=[16]))
    fit(model, guide, digits.train[:256], epochs=1, batch_size=64,
        callbacks=[GradientClipping(0.5), Norm()])  # fmt: skip
    assert len(norms) == 4 and max(norms) <= 0.5 + 1e-5
    for bad in (0, -1.0, float("nan"), True):
        with pytest.raises(PyrovaeError, match="grad_clip must be a finite number above 0"):
            GradientClipping(bad)
    with pytest.raises(PyrovaeError, match="BatchTransform needs a function"):
        BatchTransform("bernoulli")


def test_the_collapse_alarm_fires_on_collapse_only(capsys):
    assert collapse_message(history([-50, -49], kl=0.05)) is not None
    assert collapse_message(history([-50, -49], kl=2.0, active=0)) is not None
    assert collapse_message(history([-50, -49])) is None
    assert collapse_message(history([-50, -49, -48], kl=0.05)[:1]) is None  # one epoch only
    mixed = history([-50, -49], kl=0.05)
    mixed[0]["validation_kl"] = 3.0
    assert collapse_message(mixed) is None  # must last two epochs

    alarm = CollapseAlarm(grace=0)
    for n in range(1, 4):
        alarm.on_epoch_end(state_with(history([-50] * n, kl=0.01)))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrovae: warning: posterior collapse")
    assert "warm-up" in err[0] and "likelihood scale" in err[0]


def test_the_alarm_on_real_runs():
    """Data from a 2-D latent through a fixed random map plus noise of 0.05: a Gaussian
    likelihood of scale 0.05 keeps the latents busy, one of scale 5 makes the KL cost more
    than any reconstruction gains and collapses the posterior onto the prior."""
    torch.manual_seed(0)
    z = torch.randn(600, 2)
    x = torch.tanh(z @ torch.randn(2, 10)) + 0.05 * torch.randn(600, 10)
    alarms = {}
    for scale in (0.05, 5.0):
        pyro.set_rng_seed(0)
        alarm = CollapseAlarm(stream=_Sink())
        model = VAE(StandardNormal(2), Decoder(2, 10, [32], "relu"), Gaussian(scale=scale))
        guide = AmortizedGuide(DiagonalNormal(10, 2, hidden=[32], activation="relu"))
        fit(
            model,
            guide,
            x[:500],
            validation=x[500:],
            epochs=6,
            optimizer=adam(torch.nn.ModuleList([model, guide]).parameters(), 3e-3),
            batch_size=50,
            callbacks=[alarm],
        )
        alarms[scale] = alarm.message
    assert alarms[0.05] is None
    assert alarms[5.0] is not None and "posterior collapse" in alarms[5.0]


class _Sink:
    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


@pytest.mark.parametrize(
    "extra",
    [
        [],
        # A skip stack: the decoder reads z1 and z2, reconstructions replay the guide.
        ["model.layers=[{latent_dim=2, hidden=[8]}]", "model.hierarchy='skip'"],
    ],
    ids=["one-layer", "skip-stack"],
)
def test_tensorboard_logs_scalars_and_images(tmp_path, extra):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = [
        "model.latent_dim=2",
        "model.decoder.hidden=[16]",
        "guide.encoder.hidden=[16]",
        "train.batch_size=256",
        "train.epochs=2",
        'train.log="tensorboard"',
        *extra,
    ]
    train_run(None, tmp_path / "run", overrides=overrides, progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"validation/elbo", "validation/kl", "train/elbo", "lr", "images/per_s"} <= scalars
    assert [e.step for e in events.Scalars("validation/elbo")] == [1, 2]
    assert {"samples", "inputs_and_reconstructions"} <= set(events.Tags()["images"])


def test_the_alarm_gives_a_slow_start_its_grace():
    """Collapsed in epochs 1 and 2, then using the latents: no alarm with the default grace
    (a tenth of 50 epochs, 5); without grace the start alone would have fired it."""
    values = history([-50.0] * 8, kl=0.05, active=0)
    for h in values[2:]:
        h["validation_kl"], h["validation_active_units"] = 3.0, 10
    graceful, eager = CollapseAlarm(stream=_Sink()), CollapseAlarm(grace=0, stream=_Sink())
    for n in range(1, len(values) + 1):
        state = FitState(
            None, None, None, None, epochs=50, steps_per_epoch=1, batch_size=1, history=values[:n]
        )
        graceful.on_epoch_end(state)
        eager.on_epoch_end(state)
    assert graceful.message is None and eager.message is not None


def test_adam_takes_torchs_fused_kernel_where_it_has_one():
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    assert adam(params, 1e-3).defaults["fused"] is True
    assert not adam(params, 1e-3, fused=False).defaults["fused"]
    assert adamw(params, 1e-3).defaults["fused"] is True
    integer = [torch.zeros(3, dtype=torch.long)]
    assert not fused_supported(integer)
    with pytest.raises(ValueError, match="fused must be true, false or unset"):
        adam(params, 1e-3, fused="yes")
    # The fused step is Adam's step.
    grads = torch.randn(3, 2)
    steps = []
    for fused in (False, True):
        p = torch.nn.Parameter(torch.ones(3, 2))
        optimizer = adam([p], 0.1, fused=fused)
        for _ in range(3):
            p.grad = grads.clone()
            optimizer.step()
        steps.append(p.detach())
    torch.testing.assert_close(steps[0], steps[1])
