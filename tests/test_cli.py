"""The pyrovae command: round trips and one-line errors for bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pyrovae.inference.cli import main
from pyrovae.inference.experiment.runs import load_run

SMALL = [
    # Binarized digits under a Bernoulli likelihood, as these tests' figures assume.
    "--set",
    'model.likelihood={ kind = "bernoulli" }',
    "--set",
    'data.binarize="dynamic"',
    "--set",
    "model.latent_dim=2",
    "--set",
    "model.decoder.hidden=[16]",
    "--set",
    "guide.encoder.hidden=[16]",
    "--no-progress",
]


def train(tmp_path, *args, name="run"):
    return main(["train", "--out", str(tmp_path / name), "--epochs", "2", *SMALL, *args])


def one_line_error(capsys, code, *fragments):
    out = capsys.readouterr()
    # Earlier commands of a test may have warned (a two-epoch toy run has collapsed).
    out = out._replace(
        err="".join(line for line in out.err.splitlines(True) if "pyrovae: warning:" not in line)
    )
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyrovae: error: "), out.err
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in out.err


def test_train_sample_round_trip(tmp_path, capsys):
    assert train(tmp_path) == 0
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} == {
        ".pyrovae-run",
        "spec.toml",
        "checkpoint.pt",
        "previous.pt",  # the epoch before, to fall back to should checkpoint.pt be damaged
        "metrics.csv",
    }
    assert "trained" in capsys.readouterr().out
    loaded = load_run(run)
    assert loaded.epoch == 2 and loaded.spec.model.latent_dim == 2
    assert main(["sample", str(run), "-n", "16", "-o", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_extends_a_finished_run(tmp_path):
    assert train(tmp_path) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3", "--no-progress"]) == 0
    run = load_run(tmp_path / "run")
    assert run.epoch == 3 and run.spec.train.epochs == 3
    assert [h["epoch"] for h in run.history] == [1, 2, 3]


def test_existing_run_needs_force(tmp_path, capsys):
    assert train(tmp_path) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    one_line_error(capsys, train(tmp_path), "already exists", "--force")
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    assert train(tmp_path, "--force") == 0


def test_force_never_replaces_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("precious")
    one_line_error(capsys, train(tmp_path, "--force"), "not created by pyrovae as a run")
    assert (tmp_path / "run" / "thesis.tex").read_text() == "precious"


def test_checkpoint_that_does_not_match_its_spec(tmp_path, capsys):
    assert train(tmp_path) == 0
    spec = tmp_path / "run" / "spec.toml"
    spec.write_text(spec.read_text().replace("latent_dim = 2", "latent_dim = 3"))
    code = main(["sample", str(tmp_path / "run"), "-o", str(tmp_path / "s.png")])
    one_line_error(capsys, code, "does not match", "spec.toml")


def test_sample_and_report_follow_one_replace_rule(tmp_path, capsys):
    """A command's default file in the run is replaced; an existing -o file needs --force."""
    assert train(tmp_path) == 0
    run = str(tmp_path / "run")
    for _ in range(2):  # the README's `pyrovae sample RUN`, twice
        assert main(["sample", run, "-n", "4"]) == 0
        assert main(["report", run, "--limit", "20", "-k", "10"]) == 0
    assert (tmp_path / "run" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    for command in (["sample", run], ["report", run, "--limit", "20", "-k", "10"]):
        target = tmp_path / "mine.out"
        target.write_bytes(b"mine")
        capsys.readouterr()
        one_line_error(capsys, main([*command, "-o", str(target)]), "already exists", "--force")
        assert target.read_bytes() == b"mine"


def bad_file(tmp_path, array):
    np.save(tmp_path / "bad.npy", array)
    return ["--set", f"data.name='{tmp_path / 'bad.npy'}'"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--set", "model.nope=1"], ["unknown spec key 'model.nope'", "valid under model"]),
        (["--set", "model.prior.kind=vamp_nope"], ["unknown model.prior.kind", "valid:"]),
        (["--set", "guide.encoder.depth=3"], ["unknown option guide.encoder.depth", "valid:"]),
        (
            ["--set", "data.name=mnist", "--set", "data.path='/nonexistent/dir'"],
            ["mnist not found", "/nonexistent/dir"],
        ),
        (
            ["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"],
            ["device"],
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, fragments):
    one_line_error(capsys, train(tmp_path, *args), *fragments)
    assert not (tmp_path / "run").exists()


def test_threads_sets_torchs_cpu_threads(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "train", "--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(before)
        # After the command name as well.
        assert main(["train", "--out", str(tmp_path / "b"), "--epochs", "1", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    capsys.readouterr()
    one_line_error(capsys, main(["--threads", "0", "train"]), "--threads must be an integer >= 1")


@pytest.mark.parametrize(
    "array, binarize, fragment",
    [
        (np.full((50, 4), np.nan), "none", "NaN or infinite"),
        (np.ones(50), "none", "expected (points, features)"),
        (np.full((50, 4), 3.0), "none", "outside the likelihood's support [0, 1]"),
        (np.full((50, 4), 3.0), "dynamic", "needs values in [0, 1]"),
    ],
)
def test_bad_data_is_one_line_and_exit_2(tmp_path, capsys, array, binarize, fragment):
    args = [*bad_file(tmp_path, array), "--set", f"data.binarize={binarize}"]
    one_line_error(capsys, train(tmp_path, *args), fragment)
    assert not (tmp_path / "run").exists()


def test_malformed_spec_file(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text("[model]\nlatent_dim = = 2\n")
    code = main(["train", str(spec), "--out", str(tmp_path / "run")])
    one_line_error(capsys, code, "is not valid TOML")


def test_debug_shows_the_traceback(tmp_path):
    from pyrovae.inference import PyrovaeError

    with pytest.raises(PyrovaeError):
        main(["--debug", "train", "--out", str(tmp_path / "r"), "--set", "model.nope=1"])


def test_console_script_exit_code(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyrovae.inference.cli",
            "train",
            "--set",
            "model.nope=1",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "unknown spec key" in result.stderr


def test_bernoulli_on_grey_levels_has_no_bits_per_dim(tmp_path, capsys):
    import json

    assert train(tmp_path, "--set", 'data.binarize="none"') == 0
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["evaluate", run, "-k", "30", "--limit", "10"]) == 0
    shown = capsys.readouterr().out
    line = next(line for line in shown.splitlines() if line.strip().startswith("bits/dim"))
    assert "n/a" in line and "binarize" in line
    saved = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert saved["bits_per_dim"] is None and "cross-entropy" in saved["bits_per_dim_undefined"]
    assert saved["log_px"] is not None


def test_evaluate_round_trip(tmp_path, capsys):
    import json

    assert train(tmp_path) == 0
    run = str(tmp_path / "run")
    capsys.readouterr()
    assert main(["evaluate", run, "-k", "200", "--limit", "30", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert printed == saved
    assert saved["points"] == 30 and saved["num_samples"] == 200 and saved["split"] == "test"
    # The importance-sampling estimate sits above the ELBO, and the bounds climb with k.
    assert saved["elbo"] <= saved["iwae_10"] <= saved["iwae_100"] <= saved["log_px"] + 1e-9
    assert saved["bits_per_dim"] == pytest.approx(-saved["log_px"] / (64 * np.log(2)))
    assert saved["bits_per_dim_undefined"] is None
    # Other settings do not silently replace that evaluation: --force, or --output.
    other = ["evaluate", run, "-k", "50", "--split", "train", "--limit", "5"]
    one_line_error(capsys, main(other), "other settings", "num_samples 200 -> 50", "--force")
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text()) == saved
    assert main([*other, "--output", str(tmp_path / "train.json")]) == 0
    out = capsys.readouterr().out
    assert "log p(x)" in out and "k̂ > 0.7" in out
    assert json.loads((tmp_path / "train.json").read_text())["split"] == "train"
    assert main([*other, "--force"]) == 0
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())["num_samples"] == 50


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["-k", "0"], "--num-samples must be an integer >= 1, got 0"),
        (["--limit", "0"], "--limit must be an integer >= 1, got 0"),
    ],
)
def test_evaluate_bad_input(tmp_path, capsys, args, fragment):
    assert train(tmp_path) == 0
    capsys.readouterr()
    one_line_error(capsys, main(["evaluate", str(tmp_path / "run"), *args]), fragment)


def test_evaluate_a_trained_mnist_run(tmp_path, capsys, mnist_npz):
    import json

    code = main(
        [
            "train",
            "--out",
            str(tmp_path / "m"),
            "--epochs",
            "1",
            "--no-progress",
            "--set",
            "data.name=mnist",
            "--set",
            'model.likelihood={ kind = "bernoulli" }',
            "--set",
            'data.binarize="dynamic"',
            "--set",
            f"data.path='{mnist_npz}'",
            "--set",
            "model.latent_dim=8",
            "--set",
            "model.decoder.hidden=[64]",
            "--set",
            "guide.encoder.hidden=[64]",
            "--set",
            "train.batch_size=256",
        ]
    )
    assert code == 0
    assert main(["evaluate", str(tmp_path / "m"), "-k", "100", "--limit", "50"]) == 0
    saved = json.loads((tmp_path / "m" / "evaluation.json").read_text())
    assert saved["features"] == 784 and saved["points"] == 50
    # One epoch of a small VAE on binarized MNIST: far better than uniform pixels (543 nats).
    assert -250 < saved["log_px"] < -80


def test_report_and_compare_commands(tmp_path, capsys):
    assert train(tmp_path) == 0
    assert train(tmp_path, "--set", "model.latent_dim=3", name="other") == 0
    run, other = str(tmp_path / "run"), str(tmp_path / "other")
    capsys.readouterr()
    assert main(["report", run, "--limit", "40", "-k", "30"]) == 0
    assert (tmp_path / "run" / "report.html").read_text().startswith("<!DOCTYPE html>")
    target = tmp_path / "mine.html"
    target.write_text("mine")
    one_line_error(capsys, main(["report", run, "-o", str(target)]), "already exists")
    assert target.read_text() == "mine"
    assert main(["compare", run, other, "--limit", "40", "-k", "30"]) == 0
    table = capsys.readouterr().out
    assert run in table and other in table
    one_line_error(capsys, main(["compare", run]), "at least two runs")
    one_line_error(
        capsys,
        main(["compare", run, other, "-k", "0"]),
        "--num-samples must be an integer >= 1, got 0",
    )


def test_kl_schedule_from_the_spec_reaches_training(tmp_path, monkeypatch):
    import pyrovae.inference.experiment.workflow as workflow

    seen = {}
    real_fit = workflow.fit

    def spy(*args, **kwargs):
        seen["schedule"] = kwargs["kl_schedule"]
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(workflow, "fit", spy)
    assert train(tmp_path, "--set", 'train.kl={ kind = "linear", warmup_steps = 30 }') == 0
    assert seen["schedule"](0) == 0.0 and seen["schedule"](15) == pytest.approx(0.5)


def test_image_grid_tiles_row_major():
    from pyrovae.inference.reporting.plots import image_grid

    images = torch.arange(6.0).repeat_interleave(4).reshape(6, 4) / 5  # 6 tiles of 2x2
    grid = image_grid(images, (2, 2), ncol=3)
    assert grid.shape == (4, 6)
    assert grid[0, 0] == 0 and grid[0, 2] == pytest.approx(0.2) and grid[2, 0] == pytest.approx(0.6)


def test_image_grid_through_torchvision_matches_numpy(monkeypatch):
    pytest.importorskip("torchvision")
    import builtins

    from pyrovae.inference.reporting.plots import image_grid

    images = torch.rand(7, 12)
    with_torchvision = image_grid(images, (3, 4), ncol=3)
    real_import = builtins.__import__

    def no_torchvision(name, *args, **kwargs):
        if name.startswith("torchvision"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchvision)
    np.testing.assert_allclose(with_torchvision, image_grid(images, (3, 4), ncol=3))


def test_debug_works_after_the_command_name_too(tmp_path):
    with pytest.raises(Exception, match="does not exist"):
        main(["sample", str(tmp_path / "nope"), "--debug"])


def test_evaluate_the_best_checkpoint(tmp_path, capsys):
    import json

    assert train(tmp_path, "--epochs", "3", "--set", "train.patience=2") == 0
    run = str(tmp_path / "run")
    best = load_run(run, checkpoint="best")
    capsys.readouterr()
    out = str(tmp_path / "best.json")
    assert (
        main(["evaluate", run, "-k", "20", "--limit", "10", "--checkpoint", "best", "-o", out]) == 0
    )
    assert json.loads((tmp_path / "best.json").read_text())["epoch"] == best.epoch
    # A run without early stopping has no best epoch: one line that says why.
    assert train(tmp_path, name="plain") == 0
    capsys.readouterr()
    code = main(["evaluate", str(tmp_path / "plain"), "--checkpoint", "best"])
    one_line_error(capsys, code, "has no best.pt", "early stopping")


def test_seeds_directories_and_missing_spreads_are_said_plainly(tmp_path, capsys):
    assert train(tmp_path) == 0
    run = str(tmp_path / "run")
    capsys.readouterr()
    for command in (["evaluate", run], ["sample", run], ["report", run], ["compare", run, run]):
        one_line_error(capsys, main([*command, "--seed", "-1"]), "--seed must be an integer from 0")
    one_line_error(
        capsys, main(["sample", run, "-o", str(tmp_path)]), "is a directory", "samples.png"
    )
    # One point has no spread over points, one draw no Monte Carlo error: n/a, not nan.
    assert main(["evaluate", run, "-k", "1", "--limit", "1", "-o", str(tmp_path / "e.json")]) == 0
    out = capsys.readouterr().out
    assert "± n/a (Monte Carlo error of the mean n/a)" in out and "nan" not in out


def test_sample_decodes_in_chunks_and_caps_the_grid(tmp_path, capsys):
    assert train(tmp_path) == 0
    run = str(tmp_path / "run")
    assert main(["sample", run, "-n", "2500", "-o", str(tmp_path / "big.png")]) == 0
    assert (tmp_path / "big.png").stat().st_size > 0
    capsys.readouterr()
    one_line_error(capsys, main(["sample", run, "-n", "10001"]), "more than one image grid")
