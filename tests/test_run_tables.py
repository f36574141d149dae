"""The tables over trained runs (benchmarks/aggregate_kl.py, benchmarks/prior_fit.py) end to
end on a one-epoch run of a small MNIST-shaped file: each writes its rows as JSON and its
table as Markdown, pairs a fitted prior's log p(x) with the run's own where the settings
match, refuses a bad ``--num-test`` and skips where there is no data."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import aggregate_kl
import prior_fit
import pytest
import torch

from pyrovae.inference import evaluate_run, train_run

SMALL = [
    "data.validation_size=40",
    "model.latent_dim=2",
    "model.decoder.hidden=[8]",
    "guide.encoder.hidden=[8]",
    "train.epochs=1",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mnist_like):
    """A one-epoch run of the N(0, I) x diagonal config, and its data file."""
    root = tmp_path_factory.mktemp("tables")
    npz = mnist_like(root / "mnist.npz")
    run = train_run(
        prior_fit.ROOT / "configs" / "mnist-standard-diagonal.toml",
        root / "run",
        overrides=[f"data.path={json.dumps(str(npz))}", *SMALL],
        progress=False,
    )
    return run, npz


@pytest.fixture
def data_env(trained, monkeypatch):
    monkeypatch.setenv("PYROVAE_DATA", str(trained[1]))


def read(output: Path) -> tuple[dict, str]:
    return json.loads(output.with_suffix(".json").read_text()), output.with_suffix(
        ".md"
    ).read_text()


def test_aggregate_kl_brackets_each_run_and_writes_its_table(trained, data_env, tmp_path):
    run, _ = trained
    output = tmp_path / "out" / "aggregate_kl"
    argv = [str(run.path), "--num-test", "20", "--output", str(output)]
    aggregate_kl.main(argv)
    saved, table = read(output)
    (row,) = saved["rows"]
    assert row["run"] == str(run.path)
    assert (row["prior"], row["guide"]) == ("standard_normal", "diagonal_normal")
    assert row["num_points"] == 20 and row["critic_epochs"] == len(row["validation"])
    # The critic's bound lies below KL(q(z) || p(z)), itself below the mean KL of the points'
    # posteriors, up to its Monte Carlo noise (3 standard errors).
    lower, se = row["aggregate_kl_lower"], row["aggregate_kl_lower_se"]
    assert lower - 3 * se <= row["mean_kl"]
    assert f"| {row['mean_kl']:.2f} | {lower:.2f} ± {se:.2f} |" in table
    # The command that gives this table, though it was made from Python.
    assert saved["meta"]["command"].endswith(shlex.join(["benchmarks/aggregate_kl.py", *argv]))
    assert saved["meta"]["num_test"] == 20
    assert saved["meta"]["log_num_test"] == pytest.approx(torch.tensor(20.0).log().item())
    assert table.startswith("# KL(q(z) ‖ p(z))") and table.count(f"| {run.path} |") == 1


def test_prior_fit_pairs_its_log_px_with_the_runs_own_where_the_settings_match(
    trained, data_env, tmp_path
):
    run, _ = trained
    # The grid's own evaluation of the run, as priors_guides.py leaves it, with the settings
    # the table is asked for: the fitted prior's log p(x) is paired with it point by point.
    reference = evaluate_run(
        run,
        num_samples=4,
        limit=20,
        seed=0,
        output=run.path / prior_fit.EVALUATION,
        force=True,
    )
    argv = [str(run.path), "--num-test", "20", "--num-samples", "4", "--epochs", "2"]
    output = tmp_path / "prior_fit"
    prior_fit.main([*argv, "--priors", "mixture", "vamp", "--output", str(output)])
    saved, table = read(output)
    assert [r["prior"] for r in saved["rows"]] == ["mixture", "vamp"]
    own = reference.result.log_px.double().mean().item()
    for row in saved["rows"]:
        assert 1 <= row["epochs"] <= 2 and len(row["validation"]) == row["epochs"]
        assert row["delta"] == pytest.approx(row["log_px"] - own, abs=1e-9)
        assert f"{row['delta']:+.2f} ± {row['delta_se']:.2f}" in table
    assert saved["meta"]["num_samples"] == 4

    # Other settings than the grid's: no pairing, and the table says so with a dash.
    prior_fit.main([*argv[:-2], "--epochs", "1", "--seed", "1", "--priors", "mixture",
                    "--output", str(output)])  # fmt: skip
    saved, table = read(output)
    (row,) = saved["rows"]
    assert "delta" not in row and "| — |" in table


def test_a_bad_num_test_is_refused_and_missing_data_skips_the_table(
    trained, tmp_path, monkeypatch, capsys
):
    run, _ = trained
    output = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_:
        aggregate_kl.main([str(run.path), "--num-test", "1", "--output", str(output)])
    assert exit_.value.code == 2
    assert "--num-test must be at least 2" in capsys.readouterr().err

    monkeypatch.setenv("PYROVAE_DATA", str(tmp_path / "nowhere"))
    prior_fit.main([str(run.path), "--output", str(output)])
    assert capsys.readouterr().out.startswith("skipped: mnist.npz not found")
    assert not list(tmp_path.glob("never*"))
