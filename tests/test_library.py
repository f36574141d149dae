"""The library layer: the pyrovae namespace, the layers' import order, train_run and
evaluate_run, the typed checkpoint, callbacks, plain-function programs, and a hand-written
two-latent model through fit, the estimator and diagnose."""

from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import Tensor, nn

import pyrovae
from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import (
    BatchTransform,
    Callback,
    Checkpoint,
    Checkpointing,
    EarlyStopping,
    FitState,
    PyrovaeError,
    diagnose,
    evaluate_run,
    fit,
    load_data,
    load_run,
    log_marginal_likelihood,
    train_run,
)
from pyrovae.inference.experiment.recipes import adam
from pyrovae.inference.experiment.runs import load_run_data
from pyrovae.model import DATA_PLATE, OBSERVED

REPO = Path(__file__).resolve().parents[1]
TINY = [
    'model.likelihood={ kind = "bernoulli" }',
    'data.binarize="dynamic"',
    "model.latent_dim=2",
    "model.decoder.hidden=[16]",
    "guide.encoder.hidden=[16]",
    "train.epochs=2",
    "train.batch_size=256",
]


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "dynamic")


# --- the namespace ------------------------------------------------------------------------


def test_api_imports_beside_a_users_own_model_guides_and_inference_modules(tmp_path):
    """A project with its own model.py, guides.py and inference.py (most ML projects have a
    model.py) still imports pyrovae: nothing is installed under those top-level names."""
    for name in ("model", "guides", "inference"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user project {name}.py')\n")
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import importlib.util

            import pyrovae
            from pyrovae.guides import AmortizedGuide, DiagonalNormal
            from pyrovae.inference import evaluate_run, fit, log_marginal_likelihood, train_run
            from pyrovae.model import VAE, StandardNormal

            # The user's own model.py is what the bare name finds.
            assert importlib.util.find_spec("model").origin.endswith("model.py")
            print(pyrovae.VAE is VAE, pyrovae.train_run is train_run)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]


IGNORE = shutil.ignore_patterns("__pycache__")


def test_a_regular_install_holds_only_the_pyrovae_package(tmp_path):
    """The wheel a regular install uses: pyrovae/model/..., never a top-level model/."""
    source = tmp_path / "source"  # built from a copy: a build writes into its source tree
    for name in ("pyproject.toml", "README.md", "__init__.py", "model", "guides", "inference"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=IGNORE)
        else:
            source.mkdir(exist_ok=True)
            shutil.copy(REPO / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(source)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip().splitlines()[-1:]}")
    wheel = next(tmp_path.glob("pyrovae-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"pyrovae"}
    for module in ("model/vae.py", "guides/encoders.py", "inference/algorithms/scoring.py"):
        assert f"pyrovae/{module}" in names
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    check = (
        "import sys; sys.meta_path = [f for f in sys.meta_path "
        "if not type(f).__module__.startswith('__editable__')]; "
        f"sys.path.insert(0, {str(unpacked)!r}); import pyrovae.inference, pyrovae; "
        f"assert pyrovae.__file__.startswith({str(unpacked)!r}), pyrovae.__file__"
    )
    done = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


LAYERS = {
    "model": 0,
    "guides": 0,
    "inference.errors": 1,
    "inference.algorithms": 1,
    "inference.experiment": 2,
    "inference.reporting": 3,
    "inference.cli": 4,
}


def _layer(module: str) -> tuple[str, int] | None:
    name = module.removeprefix("pyrovae.")
    for prefix, level in sorted(LAYERS.items(), key=lambda kv: -len(kv[0])):
        if name == prefix or name.startswith(prefix + "."):
            return prefix, level
    return None


@pytest.mark.parametrize(
    "path", sorted(p for d in ("model", "guides", "inference") for p in (REPO / d).rglob("*.py"))
)
def test_imports_run_downwards_only(path: Path):
    """CLI above reporting above experiment above algorithms above model/ and guides/."""
    if path.name == "__init__.py" and path.parent == REPO / "inference":
        return  # the package's front door re-exports every layer
    own = _layer(".".join(path.relative_to(REPO).with_suffix("").parts))
    assert own is not None, path
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            assert target.split(".")[0] not in ("model", "guides", "inference"), (
                f"{path}: bare top-level import {target}"
            )
            layer = _layer(target) if target.startswith("pyrovae.") else None
            if layer is not None and layer[1] > own[1]:
                pytest.fail(f"{path} ({own[0]}) imports {target} ({layer[0]}), a layer above")


# --- train_run, evaluate_run, the checkpoint ------------------------------------------------


def test_train_run_and_evaluate_run_in_process(tmp_path):
    run = train_run(None, tmp_path / "run", overrides=TINY, progress=False)
    assert run.epoch == 2 and len(run.history) == 2
    assert not run.model.training and not run.guide.training
    assert (tmp_path / "run" / "spec.toml").is_file()
    saved = Checkpoint.load(tmp_path / "run")
    assert saved.epoch == 2 and saved.features == 64 and saved.image_shape == (8, 8)
    assert saved.spec == run.spec.to_toml() and len(saved.spec_hash) == 64

    resumed = train_run(None, tmp_path / "run", overrides=["train.epochs=3"], resume=True)
    assert resumed.epoch == 3 and [h["epoch"] for h in resumed.history] == [1, 2, 3]
    with pytest.raises(
        PyrovaeError, match="only train.epochs, train.device, train.log, train.compile may change"
    ):
        train_run(None, tmp_path / "run", overrides=["model.latent_dim=3"], resume=True)

    evaluation = evaluate_run(tmp_path / "run", num_samples=30, limit=20)
    assert evaluation.num_points == 20 and evaluation.epoch == 3
    written = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert written["points"] == 20 and written["num_samples"] == 30
    assert written["log_px"] == pytest.approx(evaluation.result.log_px.mean().item())
    assert len(written["per_point"]["log_px"]) == 20
    assert written["bits_per_dim"] == pytest.approx(-written["log_px"] / (64 * math.log(2)))


@pytest.mark.gpu
def test_a_run_trained_on_cuda_resumes_and_evaluates_on_either_device(tmp_path):
    run = train_run(None, tmp_path / "run", overrides=[*TINY, "train.device=cuda"], progress=False)
    assert all(p.is_cuda for p in (*run.model.parameters(), *run.guide.parameters()))
    x = load_run_data(run.spec).test[:50]  # on the CPU: diagnose moves it to the run's device
    d = diagnose(run.model, run.guide, x, num_samples=50, num_latent_samples=4)
    assert math.isfinite(d.marginal_kl) and math.isfinite(d.summary()["log_px"])
    on_cpu = train_run(
        None, tmp_path / "run", overrides=["train.epochs=3", "train.device=cpu"], resume=True
    )
    assert on_cpu.epoch == 3 and not any(p.is_cuda for p in on_cpu.model.parameters())
    cuda = evaluate_run(tmp_path / "run", num_samples=500, limit=200, device="cuda", write=False)
    cpu = evaluate_run(tmp_path / "run", num_samples=500, limit=200, device="cpu", write=False)
    # Different random streams on the two devices: the means agree within 5 Monte Carlo
    # errors (each of the order of 1e-3 nats here).
    errors = [e.result.summary()["log_px_mc_error"] for e in (cuda, cpu)]
    gap = (cuda.result.log_px.mean() - cpu.result.log_px.mean()).abs().item()
    assert gap < 5 * math.hypot(*errors) + 1e-4


def test_evaluation_json_is_strict_and_bits_per_dim_follows_the_likelihood(tmp_path):
    overrides = [*TINY, 'model.likelihood={ kind = "gaussian", scale = 0.3 }']
    overrides += ['data.binarize="none"', "train.epochs=1"]
    run = train_run(None, tmp_path / "g", overrides=overrides, progress=False)
    evaluation = evaluate_run(run, num_samples=10, limit=5, output=tmp_path / "e.json")
    text = (tmp_path / "e.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    written = json.loads(text)
    assert written["khat_bad_fraction"] is None  # K = 10 < 25: k̂ not computed
    assert all(k is None for k in written["per_point"]["khat"])
    # A density on [0, 1] data is reported on the 256-level scale: + log2(256) bits.
    expected = -evaluation.summary()["log_px"] / (64 * math.log(2)) + 8
    assert written["bits_per_dim"] == pytest.approx(expected)
    assert written["bits_per_dim_levels"] == 256


def test_checkpoint_state_round_trip_and_refusal():
    checkpoint = Checkpoint(
        epoch=3,
        model={"w": torch.ones(2)},
        guide={},
        history=[{"epoch": 1.0}],
        features=4,
        image_shape=(2, 2),
        spec="x = 1\n",
    )
    state = checkpoint.to_state()
    assert state["format"] == 3 and state["image_shape"] == [2, 2]
    again = Checkpoint.from_state(state)
    assert again.epoch == 3 and again.image_shape == (2, 2) and again.spec_hash
    torch.testing.assert_close(again.model["w"], torch.ones(2))
    with pytest.raises(PyrovaeError, match="missing epoch, model"):
        Checkpoint.from_state({"guide": {}})


def test_a_run_directory_written_by_fit_alone_is_explained(tmp_path, digits):
    model, guide = small_vae()
    fit(model, guide, digits.train[:100], epochs=1, callbacks=[Checkpointing(tmp_path)])
    with pytest.raises(PyrovaeError, match=r"written by fit \(Checkpointing\) without a spec"):
        load_run(tmp_path)
    fresh_model, fresh_guide = small_vae()
    Checkpoint.load(tmp_path).restore(fresh_model, fresh_guide)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh_model.state_dict()[key], value)


# --- fit: callbacks, plain functions, NumPy --------------------------------------------------


def small_vae(features: int = 64, latent_dim: int = 2) -> tuple[nn.Module, nn.Module]:
    from pyrovae.model import VAE, Bernoulli, Decoder, StandardNormal

    model = VAE(StandardNormal(latent_dim), Decoder(latent_dim, features, [16]), Bernoulli())
    return model, AmortizedGuide(DiagonalNormal(features, latent_dim, hidden=[16]))


class Recorder(Callback):
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []

    def on_fit_start(self, state: FitState) -> None:
        self.events.append(("start", state.epoch))

    def on_step_end(self, state: FitState, step: int, loss: Tensor) -> None:
        assert not loss.requires_grad
        self.events.append(("step", state.epoch))

    def on_epoch_end(self, state: FitState) -> None:
        assert state.history[-1]["epoch"] == state.epoch
        self.events.append(("epoch", state.epoch))
        state.stop = state.epoch == 2

    def on_fit_end(self, state: FitState) -> None:
        self.events.append(("end", state.epoch))


def test_callbacks_see_every_step_and_epoch_and_can_stop(digits):
    model, guide = small_vae()
    recorder = Recorder()
    history = fit(
        model,
        guide,
        digits.train[:300],
        epochs=5,
        batch_size=100,
        callbacks=[recorder],
    )
    assert len(history) == 2
    assert recorder.events == [
        ("start", 0),
        *[("step", 1)] * 3,
        ("epoch", 1),
        *[("step", 2)] * 3,
        ("epoch", 2),
        ("end", 2),
    ]


def test_early_stopping_is_a_callback(digits):
    model, guide = small_vae()
    stopper = EarlyStopping(patience=1, monitor="train_elbo")
    history = fit(
        model,
        guide,
        digits.train[:200],
        epochs=40,
        optimizer=adam(nn.ModuleList([model, guide]).parameters(), 0.5),
        callbacks=[stopper],
    )
    assert len(history) < 40
    scores = [h["train_elbo"] for h in history]
    assert scores[-1] <= max(scores[:-1])
    with pytest.raises(PyrovaeError, match="patience must be an integer >= 1"):
        EarlyStopping(0)


def test_fit_trains_plain_pyro_functions_on_numpy_arrays(digits):
    """Pyro users' programs: functions registering modules with pyro.module."""
    decoder = nn.Linear(2, 64)
    encoder = DiagonalNormal(64, 2, hidden=[16])

    def model(x: Tensor) -> None:
        pyro.module("decoder", decoder)
        with pyro.plate(DATA_PLATE, len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), 2), 1.0).to_event(1))
            pyro.sample(OBSERVED, dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x: Tensor) -> None:
        pyro.module("encoder", encoder)
        with pyro.plate(DATA_PLATE, len(x)):
            pyro.sample("z", encoder(x))

    pyro.get_param_store().clear()
    before = decoder.weight.detach().clone(), encoder.net[0].weight.detach().clone()
    data = digits.train.round().numpy().astype(np.float64)  # float64 NumPy input
    history = fit(model, guide, data, validation=data[:200], epochs=5)
    pyro.get_param_store().clear()
    assert not torch.equal(before[0], decoder.weight) and not torch.equal(
        before[1], encoder.net[0].weight
    )
    assert history[-1]["validation_elbo"] > history[0]["validation_elbo"]
    with pytest.raises(PyrovaeError, match="integer dtype"):
        fit(model, guide, (data * 255).astype(np.uint8), epochs=1)


# --- a hand-written two-latent model ---------------------------------------------------------


class TwoLayerModel(nn.Module):
    """z2 ~ N(0, I), z1 | z2 ~ N(net(z2)), x | z1 ~ Bernoulli(net(z1)): written by hand."""

    def __init__(self, features: int = 64, top: int = 2, bottom: int = 4) -> None:
        super().__init__()
        self.top = top
        self.middle = nn.Sequential(nn.Linear(top, 16), nn.Tanh(), nn.Linear(16, 2 * bottom))
        self.bottom = nn.Sequential(nn.Linear(bottom, 32), nn.Tanh(), nn.Linear(32, features))

    def forward(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, len(x)):
            z2 = pyro.sample("z2", dist.Normal(x.new_zeros(len(x), self.top), 1.0).to_event(1))
            loc, raw = self.middle(z2).chunk(2, -1)
            z1 = pyro.sample("z1", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))
            pyro.sample(OBSERVED, dist.Bernoulli(logits=self.bottom(z1)).to_event(1), obs=x)


class TwoLayerGuide(nn.Module):
    """q(z1 | x) q(z2 | z1), bottom-up."""

    def __init__(self, features: int = 64, top: int = 2, bottom: int = 4) -> None:
        super().__init__()
        self.first = DiagonalNormal(features, bottom, hidden=[32])
        self.second = DiagonalNormal(bottom, top, hidden=[16])

    def forward(self, x: Tensor) -> None:
        with pyro.plate(DATA_PLATE, len(x)):
            z1 = pyro.sample("z1", self.first(x))
            pyro.sample("z2", self.second(z1))


def test_a_two_latent_model_trains_is_scored_and_diagnosed(digits):
    model, guide = TwoLayerModel(), TwoLayerGuide()
    history = fit(
        model,
        guide,
        digits.train,
        validation=digits.validation,
        epochs=4,
        callbacks=[BatchTransform(torch.bernoulli)],
    )
    assert history[-1]["validation_elbo"] > history[0]["validation_elbo"]
    x = digits.test[:40]
    marginal = log_marginal_likelihood(model, guide, x, num_samples=200)
    assert torch.isfinite(marginal.log_px).all()
    # log p(x) is at least the ELBO per point, up to Monte Carlo error.
    assert (marginal.log_px - marginal.elbo > -0.5).all()
    d = diagnose(model, guide, x, marginal=marginal, num_latent_samples=32)
    assert list(d.sites) == ["z2", "z1"] and d.primary == "z2"
    assert d.sites["z1"].posterior_mean.shape == (40, 4)
    assert d.sites["z2"].samples.shape == (32, 40, 2)
    # Both KL terms are analytic per dimension given the drawn parents; their sum is the
    # total KL, and reconstruction minus KL matches the estimator's ELBO.
    assert {s.kl_method for s in d.sites.values()} == {"analytic per dimension"}
    torch.testing.assert_close(d.kl, d.sites["z1"].kl + d.sites["z2"].kl)
    assert d.elbo.mean().item() == pytest.approx(marginal.elbo.mean().item(), abs=1.0)
    summary = d.summary()
    assert summary["latent_dim"] == 6
    assert summary["active_units"] == summary["active_units[z1]"] + summary["active_units[z2]"]
    assert math.isnan(summary["mutual_information"])
    assert any("not computed for z2, z1" in note for note in d.notes)
    # The prior of z1 depends on z2: its moments come from ancestral draws.
    assert any("z1 are sample moments" in note for note in d.notes)
    torch.testing.assert_close(d.sites["z2"].prior_variance, torch.ones(2, dtype=torch.float64))


def test_pyrovae_exposes_the_most_used_names():
    for name in ("VAE", "AmortizedGuide", "fit", "train_run", "evaluate_run", "diagnose"):
        assert hasattr(pyrovae, name)
