"""The conditional VAE: labels as observed context of encoder and decoder."""

from __future__ import annotations

import dataclasses

import pyro
import pytest
import torch

from pyrovae.inference import (
    PyrovaeError,
    build,
    evaluate_run,
    load_data,
    load_run,
    load_spec,
    log_marginal_likelihood,
    train_run,
    write_report,
)
from pyrovae.inference.cli import main
from pyrovae.model import ConditionalVAE, Labelled

CONDITIONAL = "model.labels=context"
SPLITS = ("train", "validation", "test")


def test_label_context_gives_each_row_its_label_beside_the_data():
    data = load_data("digits", limit=100)
    rows = data.with_label_context(10)
    assert isinstance(rows.train, Labelled) and rows.features == 64
    assert torch.equal(rows.train.x, data.train) and torch.equal(rows.train.y, data.train_labels)
    assert rows.train.known.all() and rows.test.known.all()
    code = rows.train.one_hot(10)
    # Runs trained when labels were columns of x recorded the fingerprint of [x, one_hot(y)].
    packed = {n: torch.cat([getattr(data, n), getattr(rows, n).one_hot(10)], 1) for n in SPLITS}
    assert rows.fingerprint() == dataclasses.replace(data, **packed).fingerprint()
    assert torch.equal(code.argmax(1), data.train_labels) and torch.equal(
        code.sum(1), torch.ones(100)
    )
    with pytest.raises(PyrovaeError, match=r"outside \[0, model.classes = 5\)"):
        data.with_label_context(5)


def test_unlabelled_data_are_refused_for_a_conditional_model():
    data = load_data("digits", limit=100)
    unlabelled = dataclasses.replace(data, test_labels=None)
    with pytest.raises(PyrovaeError, match="needs labelled data.*test split"):
        unlabelled.with_label_context(10)


def test_a_conditional_spec_builds_a_cvae_whose_likelihood_sees_only_x():
    spec = load_spec(None, [CONDITIONAL, "model.latent_dim=3"])
    model, guide = build(spec, 64, (8, 8))
    assert isinstance(model, ConditionalVAE) and model.classes == 10
    rows = Labelled(torch.rand(5, 64), torch.arange(5))
    trace = pyro.poutine.trace(model).get_trace(rows)
    assert torch.equal(trace.nodes["x"]["value"], rows.x)
    assert guide.encoder.net[0].in_features == 74  # q(z | x, y) reads [x, one_hot(y)]
    guide_trace = pyro.poutine.trace(guide).get_trace(rows)
    assert guide_trace.nodes["z"]["value"].shape == (5, 3)
    with pytest.raises(PyrovaeError, match="model.labels must be one of none, context, latent"):
        load_spec(None, ["model.labels=observed"])


def test_conditional_samples_follow_their_label():
    spec = load_spec(None, [CONDITIONAL, "model.latent_dim=3"])
    model, _ = build(spec, 64, (8, 8))
    pyro.set_rng_seed(0)
    threes = model.sample(6, labels=3)
    pyro.set_rng_seed(0)
    fours = model.sample(6, labels=4)
    assert threes.shape == (6, 64) and not torch.allclose(threes, fours)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        model.sample(2, labels=10)


@pytest.fixture(scope="module")
def cvae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cvae") / "run"
    return train_run(None, out, overrides=[CONDITIONAL, "train.epochs=5"], progress=False)


def test_a_trained_cvae_uses_its_labels(cvae_run):
    data = load_run(cvae_run.path)
    rows, labels = load_data("digits").with_label_context(10).split("test")
    rows = rows[:200]
    model, guide = data.model, data.guide
    wrong = Labelled(rows.x, (rows.y + 1) % 10)  # every label shifted to the next class
    pyro.set_rng_seed(0)
    right = log_marginal_likelihood(model, guide, rows, num_samples=200).log_px
    shifted = log_marginal_likelihood(model, guide, wrong, num_samples=200).log_px
    # log p(x | y) with the true label is higher than with a wrong one on most points.
    assert (right > shifted).float().mean() > 0.8
    assert right.mean() > shifted.mean() + 1.0  # nats per point


def test_a_cvae_run_evaluates_reports_and_samples_by_class(cvae_run, tmp_path, capsys):
    run = cvae_run
    evaluation = evaluate_run(run, num_samples=20, limit=50, output=tmp_path / "e.json")
    assert evaluation.features == 64  # bits/dim over pixels, not the label columns
    loaded = load_run(run.path)
    again = evaluate_run(loaded, num_samples=20, limit=50, output=tmp_path / "f.json")
    assert torch.equal(evaluation.result.log_px, again.result.log_px)
    page = write_report(run.path, limit=60, num_samples=10, path=tmp_path / "r.html")
    assert "one row per class" in page.read_text()
    assert main(["sample", str(run.path), "--label", "3", "-o", str(tmp_path / "3.png")]) == 0
    assert (tmp_path / "3.png").is_file()
    code = main(["sample", str(run.path), "--label", "10", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "not a class" in err and len(err.strip().splitlines()) == 1


def test_a_label_prior_is_p_z_given_y_and_only_for_conditional_models():
    spec = load_spec(None, [CONDITIONAL, "model.latent_dim=2", 'model.prior={kind="label_normal"}'])
    model, guide = build(spec, 64, (8, 8))
    with torch.no_grad():
        model.prior.loc[3] = torch.tensor([5.0, -5.0])  # class 3 lives far from the others
    rows = Labelled(torch.rand(4, 64), torch.tensor([3, 3, 0, 1]))
    trace = pyro.poutine.trace(model).get_trace(rows)
    prior = trace.nodes["z"]["fn"]
    assert torch.allclose(prior.mean[:2], torch.tensor([[5.0, -5.0]] * 2))
    assert torch.allclose(prior.mean[2:], torch.zeros(2, 2))
    pyro.set_rng_seed(0)
    draws = pyro.poutine.trace(lambda: model.sample(200, labels=3)).get_trace()
    assert abs(draws.nodes["z"]["value"].mean(0) - torch.tensor([5.0, -5.0])).max() < 0.3
    with pytest.raises(PyrovaeError, match="set model.labels = 'context'"):
        build(load_spec(None, ['model.prior={kind="label_normal"}']), 64, (8, 8))
