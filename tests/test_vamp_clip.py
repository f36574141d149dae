"""The pseudo-input clipping comparison (benchmarks/vamp_clip.py) on a small MNIST-shaped
file: both arms train the same config from the same seed, the clipped one with
``prior.clip = true``; Δ is paired on the same points; a stopped arm resumes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import vamp_clip

from pyrovae.inference import load_run, train_run

SMALL = [
    "data.validation_size=40",
    "model.latent_dim=2",
    "model.prior.components=5",
    "model.decoder.hidden=[8]",
    "guide.encoder.hidden=[8]",
]


@pytest.fixture
def npz(tmp_path, mnist_like):
    return mnist_like(tmp_path / "mnist.npz")


def test_both_arms_train_the_same_config_and_the_clipped_one_is_paired_with_the_other(
    tmp_path, npz
):
    runs, out = tmp_path / "runs", tmp_path / "out"
    # The clipped arm was stopped after one of its two epochs: it resumes, not restarts.
    stopped = train_run(
        vamp_clip.ROOT / vamp_clip.CONFIG,
        runs / "clipped-e2-s0",
        overrides=[f"data.path={json.dumps(str(npz))}", "train.epochs=1", "train.seed=0"]
        + SMALL
        + vamp_clip.ARMS["clipped"][0],
        progress=False,
    )
    first = stopped.history[0]["validation_elbo"]
    argv = ["--epochs", "2", "--num-samples", "4", "--data", str(npz)]
    argv += ["--runs", str(runs), "--output", str(out)]
    for override in SMALL:
        argv += ["--set", override]
    assert vamp_clip.main(argv) == 0

    rows = {r["arm"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"unclipped", "clipped"}
    clipped, unclipped = load_run(runs / "clipped-e2-s0"), load_run(runs / "unclipped-e2-s0")
    assert clipped.model.prior.clip and not unclipped.model.prior.clip
    assert clipped.epoch == unclipped.epoch == 2
    assert clipped.history[0]["validation_elbo"] == first
    for r in rows.values():
        assert r["epochs"] == 2 and r["points"] == 30 and len(r["per_point"]) == 30
        assert 0 <= r["pseudo_inputs_outside"] <= 1
    diff = torch.tensor(rows["clipped"]["per_point"]) - torch.tensor(rows["unclipped"]["per_point"])
    page = out.with_suffix(".md").read_text()
    assert f"| {diff.mean():+.2f} ± {diff.std() / 30**0.5:.2f} |" in page
    assert "| baseline |" in page


def test_the_share_of_pseudo_inputs_outside_the_unit_interval():
    u = torch.tensor([[-0.1, 0.0, 0.5, 1.0], [1.2, 0.3, 0.7, 0.9]])
    assert vamp_clip.outside_unit_interval(u) == pytest.approx(2 / 8)


def test_a_longer_budget_trains_on_from_a_copy_of_the_shorter_run_of_the_same_settings(
    tmp_path, npz
):
    runs, out = tmp_path / "runs", tmp_path / "out"
    argv = ["unclipped", "--num-samples", "2", "--data", str(npz), "--runs", str(runs)]
    argv += ["--output", str(out)]
    for override in SMALL:
        argv += ["--set", override]
    assert vamp_clip.main([*argv, "--epochs", "1"]) == 0
    shorter = load_run(runs / "unclipped-e1-s0").history
    assert vamp_clip.main([*argv, "--epochs", "2"]) == 0
    longer = load_run(runs / "unclipped-e2-s0")
    assert longer.epoch == 2
    assert longer.history[0] == shorter[0]  # the same epoch, timings included: not retrained
    assert load_run(runs / "unclipped-e1-s0").history == shorter  # the shorter run unchanged
    assert not list(runs.glob(".*"))  # no staging folder left behind
    # Other settings (here another decoder width) train from epoch 0 beside the same run.
    other = tmp_path / "other"
    shutil.copytree(runs / "unclipped-e1-s0", other / "unclipped-e1-s0")
    argv[argv.index(str(runs))] = str(other)
    argv[argv.index("model.decoder.hidden=[8]")] = "model.decoder.hidden=[6]"
    assert vamp_clip.main([*argv, "--epochs", "2"]) == 0
    assert load_run(other / "unclipped-e2-s0").history[0] != shorter[0]
