"""M2, the semi-supervised VAE: partial labels, enumeration of y, accuracy, the CLI path."""

from __future__ import annotations

import dataclasses
import math
import shutil

import pyro
import pytest
import torch
from pyro.infer import TraceEnum_ELBO
from torch import nn

from pyrovae.guides import Classifier, SemiSupervisedGuide
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
from pyrovae.inference.experiment import runs
from pyrovae.inference.experiment.build import build_optimizer
from pyrovae.inference.experiment.runs import Checkpoint
from pyrovae.model import (
    Bernoulli,
    ConditionalNormal,
    Labelled,
    SemiSupervisedVAE,
    StandardNormal,
)

M2 = ["model.labels=latent", 'train.objective={kind="enumerated_elbo"}']


def test_partial_labels_keep_a_fixed_number_per_class_in_training_only():
    data = load_data("digits")
    rows = data.with_partial_labels(10, 5)
    kept = rows.train.known
    assert kept.sum() == 50 and torch.equal(rows.train.x, data.train)  # x stays as it was
    assert torch.equal(torch.bincount(data.train_labels[kept], minlength=10), torch.full((10,), 5))
    assert torch.equal(rows.train.y[kept], data.train_labels[kept])  # the true labels
    assert not rows.validation.known.any() and not rows.test.known.any()
    again = data.with_partial_labels(10, 5)
    assert torch.equal(again.train.known, kept)  # a fixed seed picks them
    with pytest.raises(PyrovaeError, match="fewer than data.labels_per_class = 1000"):
        data.with_partial_labels(10, 1000)


def test_a_labelled_share_repeats_the_labelled_rows_with_their_labels():
    data = load_data("digits")
    rows = data.with_partial_labels(10, 5, share=0.2)
    known = rows.train.known
    copies = round(0.2 * (len(data.train) - 50) / (0.8 * 50))
    assert known.sum() == 50 * copies and (~known).sum() == len(data.train) - 50
    assert abs(known.float().mean().item() - 0.2) < 0.02  # whole copies: about the share
    assert torch.equal(rows.train.y, rows.train_labels)
    assert len(rows.train_labels) == len(rows.train)


def _tiny_m2(alpha: float = 2.0):
    """M2 with 3 classes over 4 binary features, whose decoder reads only y and whose
    q(z|x, y) is the prior N(0, I): the z terms cancel, and the ELBO is a sum over y."""
    torch.manual_seed(0)
    classes, features, latent = 3, 4, 2
    decoder = nn.Linear(latent + classes, features)
    encoder = ConditionalNormal(features + classes, latent, hidden=[])
    with torch.no_grad():
        decoder.weight[:, :latent] = 0  # p(x | y, z) = p(x | y)
        encoder.net[0].weight.zero_()
        encoder.net[0].bias.zero_()
        one = torch.tensor(1.0 - encoder.min_scale)
        encoder.net[0].bias[latent:] = one + torch.log(-torch.expm1(-one))  # scale 1
    classifier = Classifier(features, classes, hidden=[])
    model = SemiSupervisedVAE(
        StandardNormal(latent), decoder, Bernoulli(), classes, classifier, alpha
    )
    guide = SemiSupervisedGuide(encoder, classifier, classes)
    return model, guide, decoder, classifier


def test_enumerated_elbo_equals_the_explicit_sum_over_the_labels():
    model, guide, decoder, classifier = _tiny_m2(alpha=2.0)
    x = torch.bernoulli(torch.full((8, 4), 0.5), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([2, 0, 1])
    known = torch.arange(8) >= 5  # the last 3 rows are labelled
    rows = Labelled(x, torch.cat([torch.zeros(5, dtype=torch.long), labels]), known)
    loss = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide, rows)

    def log_px_given_y(xs: torch.Tensor, y: int) -> torch.Tensor:
        context = torch.eye(3)[y].expand(len(xs), 3)
        logits = decoder(torch.cat([torch.zeros(len(xs), 2), context], 1))
        return torch.distributions.Bernoulli(logits=logits).log_prob(xs).sum(1)

    log_prior_y = math.log(1 / 3)
    q = classifier(x[:5]).probs
    unlabelled = sum(
        q[:, y] * (log_prior_y + log_px_given_y(x[:5], y) - q[:, y].log()) for y in range(3)
    )
    labelled = torch.stack(
        [
            log_prior_y
            + log_px_given_y(x[5 + i : 6 + i], int(y))[0]
            + 2.0 * classifier(x[5 + i]).log_prob(torch.eye(3)[y])
            for i, y in enumerate(labels)
        ]
    )
    assert torch.allclose(loss, -(unlabelled.sum() + labelled.sum()), atol=1e-5)


def test_a_spec_with_latent_labels_builds_m2():
    spec = load_spec(None, [*M2, "model.latent_dim=3"])
    model, guide = build(spec, 64, (8, 8))
    assert isinstance(model, SemiSupervisedVAE) and isinstance(guide, SemiSupervisedGuide)
    assert model.classifier is guide.classifier  # one q(y|x), a submodule of both
    assert guide.encoder.net[0].in_features == 64 + 10  # q(z | x, y) reads [x, one_hot(y)]
    shared = nn.ModuleList([model, guide]).parameters()
    assert len(list(shared)) == len({id(p) for p in [*model.parameters(), *guide.parameters()]})
    with pytest.raises(PyrovaeError, match="takes no model.layers"):
        build(load_spec(None, [*M2, "model.layers=[{latent_dim=2}]"]), 64, (8, 8))


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("m2") / "run"
    overrides = [*M2, "data.labels_per_class=10", "train.epochs=3", "model.latent_dim=8"]
    return train_run(None, out, overrides=overrides, progress=False)


def test_m2_trains_on_dynamically_binarized_digits(tmp_path):
    # The paper config's data: partial labels and a fresh binarization of every batch
    # (the probe step before training and the batch transform both see Labelled batches).
    overrides = [
        *M2,
        "data.labels_per_class=10",
        'data.binarize="dynamic"',
        "train.epochs=1",
        "model.latent_dim=4",
    ]
    run = train_run(None, tmp_path / "run", overrides=overrides, progress=False)
    assert run.epoch == 1 and math.isfinite(run.history[-1]["train_elbo"])
    x, _ = run.points("test", 10)
    assert set(x.x.unique().tolist()) <= {0.0, 1.0}  # evaluated on binary images


def test_m2_learns_to_classify_from_ten_labels_per_class(m2_run, tmp_path):
    evaluation = evaluate_run(m2_run, num_samples=20, output=tmp_path / "e.json")
    # 300 test digits, 100 labels in all, 3 epochs, seed 0: far above chance (10%).
    assert evaluation.accuracy > 0.6
    assert evaluation.summary()["accuracy"] == evaluation.accuracy
    assert evaluation.features == 64
    assert torch.isfinite(evaluation.result.log_px).all()


def test_an_m2_run_round_trips_reports_and_samples(m2_run, tmp_path, capsys):
    loaded = load_run(m2_run.path)
    first = evaluate_run(m2_run, num_samples=20, limit=100, output=tmp_path / "a.json")
    again = evaluate_run(loaded, num_samples=20, limit=100, output=tmp_path / "b.json")
    assert torch.equal(first.result.log_px, again.result.log_px)
    assert first.accuracy == again.accuracy
    page = write_report(m2_run.path, limit=60, num_samples=10, path=tmp_path / "r.html")
    assert "one row per class" in page.read_text()
    assert main(["sample", str(m2_run.path), "--label", "7", "-o", str(tmp_path / "7.png")]) == 0
    assert (
        main(
            [
                "evaluate",
                str(m2_run.path),
                "-k",
                "10",
                "--limit",
                "50",
                "-o",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    assert "classification accuracy" in capsys.readouterr().out
    ais = ["evaluate", str(m2_run.path), "--method", "ais", "--limit", "5", "--steps", "2"]
    assert main([*ais, "-o", str(tmp_path / "d.json")]) == 2  # HMC cannot move the label
    err = capsys.readouterr().err
    assert "['y'] are discrete" in err and len(err.strip().splitlines()) == 1


def test_importance_sampling_of_m2_converges_to_the_exact_sum_over_labels():
    model, guide, decoder, classifier = _tiny_m2()
    x = torch.bernoulli(torch.full((6, 4), 0.5), generator=torch.Generator().manual_seed(2))
    rows = Labelled.unlabelled(x)  # as test data are
    with torch.no_grad():
        per_label = torch.stack(
            [
                torch.distributions.Bernoulli(
                    logits=decoder(torch.cat([torch.zeros(6, 2), torch.eye(3)[y].expand(6, 3)], 1))
                )
                .log_prob(x)
                .sum(1)
                for y in range(3)
            ]
        )
    exact = torch.logsumexp(per_label + math.log(1 / 3), 0)  # log sum_y p(y) p(x | y)
    pyro.set_rng_seed(0)
    estimate = log_marginal_likelihood(model, guide, rows, num_samples=4000)
    # y and z drawn from q(y|x) q(z|x, y): 4,000 draws, fixed seed; within 4 of the
    # estimator's own Monte Carlo errors of every point (and 0.05 nats).
    error = (estimate.log_px.float() - exact).abs()
    assert (error < 4 * estimate.stderr.float()).all() and (error < 0.05).all()


def test_a_run_from_when_labels_were_columns_of_x_loads_and_resumes(m2_run, tmp_path, monkeypatch):
    """Checkpoints of format 2 counted the label columns among the features, and M2's
    classifier was the guide's alone (its parameters after the model's in the optimizer's
    order). Such a run evaluates as it did and resumes with its optimizer state in place."""
    old = tmp_path / "old"
    shutil.copytree(m2_run.path, old)
    checkpoint = Checkpoint.load(old)
    spec = load_spec(old / "spec.toml")

    def fresh():
        model, guide = build(spec, 64, (8, 8))
        return model, guide, build_optimizer(spec, nn.ModuleList([model, guide]).parameters())

    model, guide, optimizer = fresh()
    shared = {id(p) for p in guide.parameters()}
    now = [p for group in optimizer.param_groups for p in group["params"]]
    then = [p for p in model.parameters() if id(p) not in shared] + list(guide.parameters())
    assert [id(p) for p in then] != [id(p) for p in now]  # the order did change
    index = {id(p): i for i, p in enumerate(now)}
    saved = checkpoint.optimizer
    moved = {j: saved["state"][index[id(p)]] for j, p in enumerate(then)}
    group = {**saved["param_groups"][0], "params": list(range(len(then)))}
    legacy = dataclasses.replace(
        checkpoint,
        features=64 + 10,
        model={k: v for k, v in checkpoint.model.items() if not k.startswith("classifier.")},
        optimizer={"state": moved, "param_groups": [group]},
    )
    monkeypatch.setattr(runs, "FORMAT", 2)
    legacy.save(old)
    monkeypatch.undo()

    loaded = load_run(old)
    assert loaded.checkpoint.features == 64
    first = evaluate_run(m2_run, num_samples=10, limit=40, write=False)
    again = evaluate_run(loaded, num_samples=10, limit=40, write=False)
    assert torch.equal(first.result.log_px, again.result.log_px)
    checkpoint.restore(model, guide, optimizer)
    other_model, other_guide, other_optimizer = fresh()
    Checkpoint.load(old).restore(other_model, other_guide, other_optimizer)
    for mine, theirs in zip(
        optimizer.state_dict()["state"].values(),
        other_optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        for key in mine:
            assert torch.equal(mine[key], theirs[key])
