"""The M2 recipe comparison (benchmarks/m2_recipe.py) on a small MNIST-shaped file: each arm's
per-epoch test accuracy is the classifier's, and the table renders from the results."""

from __future__ import annotations

import json

import m2_recipe
import torch

from pyrovae.inference import load_run


def test_an_arm_records_the_classifiers_test_accuracy_after_every_epoch(tmp_path, mnist_like):
    npz = mnist_like(tmp_path / "mnist.npz", train=300, test=40)
    small = ["data.validation_size=40", "model.latent_dim=2", "data.labels_per_class=2"]
    argv = ["their-batches", "--epochs", "2", "--data", str(npz)]
    argv += ["--runs", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]
    for override in small:
        argv += ["--set", override]
    assert m2_recipe.main(argv) == 0
    (row,) = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert [p["epoch"] for p in row["curve"]] == [1, 2]
    assert all(p["points"] == 40 for p in row["curve"])
    run = load_run(tmp_path / "runs" / "their-batches-e2-s0")
    x, labels = run.points("test")
    with torch.no_grad():
        guess = run.guide.classifier(x.x).probs.argmax(-1)
    assert row["curve"][-1]["accuracy"] == (guess == labels).double().mean().item()
    assert run.spec.train.batch_size == 500  # the arm's override
    page = (tmp_path / "out.md").read_text()
    assert f"{100 * row['curve'][-1]['accuracy']:.1f}%" in page and "epoch 2" in page
