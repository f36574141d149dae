"""benchmarks/independent_estimate.py: a hand-written importance sampler, with every density
written out, agrees with the library's estimate of the same run on the same points."""

from __future__ import annotations

import json

import independent_estimate
import pytest

from pyrovae.inference import evaluate_run, train_run


@pytest.mark.parametrize(
    "prior", ['{ kind = "vamp", components = 7 }', '{ kind = "standard_normal" }']
)
def test_the_hand_written_estimate_agrees_with_the_librarys(tmp_path, capsys, prior):
    run = tmp_path / "run"
    overrides = [
        'data.binarize="dynamic"',
        'model.likelihood={ kind = "bernoulli" }',
        f"model.prior={prior}",
        "model.latent_dim=3",
        "train.epochs=2",
    ]
    train_run(None, run, overrides=overrides, progress=False)
    evaluate_run(run, num_samples=4000, limit=12, output=tmp_path / "e.json")
    argv = [str(run), "--checkpoint", "latest", "--evaluation", str(tmp_path / "e.json")]
    capsys.readouterr()
    assert independent_estimate.main([*argv, "--points", "12", "-k", "4000"]) == 0
    result = json.loads(capsys.readouterr().out)
    # Other draws of the same estimator: the per-point difference is Monte Carlo noise only,
    # within 4 standard errors and 0.05 nats. A VampPrior missing its -log K would be 1.9 off.
    assert result["points"] == 12
    assert abs(result["difference"]) < 4 * result["difference_se"] + 0.05, result
    assert result["hand_written_log_px"] < 0


def test_a_run_it_does_not_cover_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    train_run(None, run, overrides=["train.epochs=1"], progress=False)  # a Gaussian likelihood
    assert independent_estimate.main([str(run), "--checkpoint", "latest"]) == 2
    assert "Bernoulli" in capsys.readouterr().err
