"""Nothing lost, nothing half-done: every bad input, file or environment problem is one line
on stderr, exit code 2, no traceback, and nothing that was on disk changes."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from interrupt import InterruptAt

from pyrovae.inference import (
    Callback,
    Checkpoint,
    Checkpointing,
    PyrovaeError,
    fit,
    load_run,
    log_marginal_likelihood,
    train_run,
)
from pyrovae.inference.cli import main
from pyrovae.inference.errors import DiskFull, Interrupted
from pyrovae.inference.experiment.runs import atomic_write
from pyrovae.model import VAE, Bernoulli, Decoder

TINY = [
    "--set",
    "model.latent_dim=2",
    "--set",
    "model.decoder.hidden=[16]",
    "--set",
    "guide.encoder.hidden=[16]",
    "--set",
    "train.batch_size=256",
    "--no-progress",
]
SETTINGS = TINY[1:8:2]
"""The same small model as ``train_run`` overrides."""
TINY_SPEC = """\
[model]
latent_dim = 2
decoder = { hidden = [16] }
[guide]
encoder = { hidden = [16] }
[train]
epochs = 1
batch_size = 256
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run with a K = 30 evaluation, made once for the module."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["train", "--out", str(root / "keep"), "--epochs", "1", *TINY]) == 0
    assert main(["evaluate", str(root / "keep"), "-k", "30", "--limit", "10"]) == 0
    return root / "keep"


@pytest.fixture
def workspace(tmp_path, trained, monkeypatch) -> Path:
    """A user's folder: a trained run, an experiment folder that is not a run, odd data."""
    shutil.copytree(trained, tmp_path / "runs" / "keep")
    (tmp_path / "myexp").mkdir()
    (tmp_path / "myexp" / "spec.toml").write_text(TINY_SPEC)
    np.savez(tmp_path / "myexp" / "data.npz", x_train=np.random.rand(50, 4))
    (tmp_path / "myexp" / "notes.txt").write_text("a week of notes")
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "outside.npz",
        x_train=rng.random((100, 6)),
        x_test=2.0 * rng.random((20, 6)),  # grey levels up to 2: no Bernoulli data
    )
    np.savez(
        tmp_path / "labels.npz",
        x_train=rng.random((100, 6)),
        y_train=np.array(["cat", "dog"] * 50),
    )
    (tmp_path / "afile").write_text("a plain file")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def checksum(root: Path) -> dict[str, str]:
    """Every path under ``root`` (hidden ones too) with a digest of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "dir"
        for p in sorted(root.rglob("*"))
    }


LONG = "x" * 300
CASES = [
    # Data loss: --force only replaces what pyrovae made, never what this run reads.
    (
        "force-foreign",
        ["train", "myexp/spec.toml", "--out", "myexp", "--force"],
        "not created by pyrovae",
    ),
    (
        "force-own-spec",
        ["train", "runs/keep/spec.toml", "--out", "runs/keep", "--force", "--no-progress"],
        "which this run reads",
    ),
    (
        "force-batch-0",
        ["train", "--out", "runs/keep", "--force", "--set", "train.batch_size=0"],
        "train.batch_size must be an integer >= 1",
    ),
    (
        "force-lr-neg",
        ["train", "--out", "runs/keep", "--force", "--set", "train.lr=-1"],
        "train.lr must be a finite number > 0",
    ),
    (
        "force-lr-nan",
        ["train", "--out", "runs/keep", "--force", "--set", "train.lr=nan"],
        "train.lr must be a finite number > 0, got nan",
    ),
    (
        "force-patience-0",
        ["train", "--out", "runs/keep", "--force", "--set", "train.patience=0"],
        "train.patience must be an integer >= 1",
    ),
    (
        "grad-clip-neg",
        ["train", "--out", "runs/new", "--set", "train.grad_clip=-1"],
        "train.grad_clip must be a finite number > 0",
    ),
    (
        "seed-neg",
        ["train", "--out", "runs/new", "--set", "train.seed=-1"],
        "train.seed must be an integer >= 0",
    ),
    (
        "latent-0",
        ["train", "--out", "runs/new", "--set", "model.latent_dim=0"],
        "model.latent_dim must be an integer >= 1 and <= 4096",
    ),
    ("latent-huge", ["train", "--out", "runs/new", "--set", "model.latent_dim=1000000"], "<= 4096"),
    (
        "epochs-0",
        ["train", "--out", "runs/new", "--epochs", "0"],
        "train.epochs must be an integer >= 1",
    ),
    (
        "scale-neg",
        [
            "train",
            "--out",
            "runs/new",
            "--set",
            'model.likelihood={ kind = "gaussian", scale = -1.0 }',
        ],
        "scale must be positive",
    ),
    (
        "components-0",
        ["train", "--out", "runs/new", "--set", 'model.prior={ kind = "mixture", components = 0 }'],
        "components must be a positive integer",
    ),
    # Resume.
    (
        "resume-fewer",
        ["train", "--resume", "runs/keep", "--epochs", "1"],
        "already trained 1 epoch",
    ),
    ("resume-missing", ["train", "--resume", "runs/nope"], "runs/nope does not exist"),
    (
        "resume-edits",
        ["train", "--resume", "runs/keep", "--set", "model.latent_dim=3"],
        "drop SPEC, --set",
    ),
    # Files and folders.
    ("out-under-file", ["train", "--out", "afile/run", *TINY], "afile is not a directory"),
    ("out-too-long", ["train", "--out", LONG, *TINY], "File name too long"),
    ("out-proc", ["train", "--out", "/proc/pyrovae-run", *TINY], None),
    ("sample-ext", ["sample", "runs/keep", "-o", "s.xyz"], "unknown extension '.xyz'"),
    ("sample-folder", ["sample", "runs/keep", "-o", "missing/s.png"], "missing does not exist"),
    ("sample-proc", ["sample", "runs/keep", "-o", "/proc/s.png"], None),
    (
        "sample-no-extension",
        ["sample", "runs/keep", "-o", "afile", "--force"],
        "unknown extension '(none)'",
    ),
    (
        "report-folder",
        ["report", "runs/keep", "-o", "missing/r.html", "--limit", "10", "-k", "5"],
        "missing does not exist",
    ),
    (
        "report-proc",
        ["report", "runs/keep", "-o", "/proc/r.html", "--limit", "10", "-k", "5"],
        None,
    ),
    ("report-missing-run", ["report", "runs/nope"], "runs/nope does not exist"),
    (
        "evaluate-folder",
        ["evaluate", "runs/keep", "-o", "missing/e.json", "-k", "5", "--limit", "5"],
        "missing does not exist",
    ),
    (
        "evaluate-proc",
        ["evaluate", "runs/keep", "-o", "/proc/e.json", "-k", "5", "--limit", "5"],
        None,
    ),
    (
        "evaluate-other-settings",
        ["evaluate", "runs/keep", "-k", "1", "--limit", "1"],
        "other settings (num_samples 30 -> 1, limit 10 -> 1)",
    ),
    (
        "evaluate-too-long",
        ["evaluate", "runs/keep", "-o", LONG + ".json", "-k", "5"],
        "File name too long",
    ),
    # Data.
    (
        "test-split-outside",
        [
            "train",
            "--out",
            "runs/new",
            "--set",
            'data.name="outside.npz"',
            "--set",
            'model.likelihood={ kind = "bernoulli" }',
            "--set",
            'data.binarize="none"',
            *TINY,
        ],
        "test data has values in [",
    ),
    (
        "string-labels",
        ["train", "--out", "runs/new", "--set", 'data.name="labels.npz"', *TINY],
        "labels must be integers",
    ),
]


@pytest.mark.parametrize("args, fragment", [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_bad_input_is_one_line_and_changes_nothing(workspace, capsys, args, fragment):
    before = checksum(workspace)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 3 and "Traceback" not in err, err
    assert lines[-1].startswith("pyrovae: error: "), err
    if fragment is not None:
        assert fragment in lines[-1]
    assert checksum(workspace) == before


def test_force_replaces_a_run_only_once_the_new_one_has_a_checkpoint(workspace, capsys):
    """The old run stays whole while the new one trains its first epoch, then is replaced."""
    old = Checkpoint.load(workspace / "runs" / "keep")
    with pytest.raises(Interrupted, match="no epoch finished, so runs/keep is unchanged"):
        train_run(
            None,
            "runs/keep",
            overrides=[*SETTINGS],
            force=True,
            progress=False,
            callbacks=[InterruptAt(1)],
        )
    assert Checkpoint.load(workspace / "runs" / "keep").model.keys() == old.model.keys()
    assert not [p for p in (workspace / "runs").iterdir() if p.name.startswith(".")]
    run = train_run(
        None,
        "runs/keep",
        overrides=["model.latent_dim=3", "train.epochs=1"],
        force=True,
        progress=False,
    )
    assert run.spec.model.latent_dim == 3
    assert load_run(workspace / "runs" / "keep").spec.model.latent_dim == 3
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == ["keep"]


def test_interruption_and_divergence_say_what_was_kept(workspace):
    with pytest.raises(Interrupted, match="nothing was written to runs/fresh"):
        train_run(
            None, "runs/fresh", overrides=SETTINGS, progress=False, callbacks=[InterruptAt(1)]
        )
    assert not (workspace / "runs" / "fresh").exists()
    with pytest.raises(Interrupted, match="the checkpoint of epoch 1 in runs/fresh is kept"):
        train_run(
            None,
            "runs/fresh",
            overrides=[*SETTINGS, "train.epochs=3"],
            progress=False,
            callbacks=[InterruptAt(2)],
        )
    assert Checkpoint.load(workspace / "runs" / "fresh").epoch == 1


def no_space(fd: int) -> None:
    """``os.fsync`` on a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class DiskFullAt(Callback):
    """From the start of epoch ``epoch``, the file system has no room for new files."""

    def __init__(self, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.epoch = epoch
        self.monkeypatch = monkeypatch

    def on_epoch_start(self, state) -> None:
        if state.epoch == self.epoch:
            self.monkeypatch.setattr(os, "fsync", no_space)


def test_a_full_disk_names_the_file_and_what_was_kept(workspace, monkeypatch, capsys):
    """No room for the checkpoint of epoch 2: one line names the file and says that the
    checkpoint of epoch 1 is kept, which loads; no partial temporary file is left."""
    run_dir = workspace / "runs" / "full"
    with pytest.raises(DiskFull) as caught:
        train_run(None, run_dir, overrides=[*SETTINGS, "train.epochs=3"], progress=False,
                  callbacks=[DiskFullAt(2, monkeypatch)])  # fmt: skip
    message = str(caught.value)
    assert f"no space left on the device to write {run_dir / 'checkpoint.pt'}" in message
    assert "MiB free" in message
    assert f"the checkpoint of epoch 1 in {run_dir} is kept" in message
    assert f"--resume {run_dir}" in message and "\n" not in message
    monkeypatch.undo()
    assert Checkpoint.load(run_dir).epoch == 1
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".checkpoint.pt.")]

    target = workspace / "notes.bin"
    target.write_bytes(b"kept")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFull, match="notes.bin is unchanged"):
        atomic_write(target, b"new bytes")
    assert target.read_bytes() == b"kept"
    assert sorted(p.name for p in workspace.iterdir() if p.name.startswith(".notes")) == []


def test_a_run_knows_its_data_from_any_directory(workspace, monkeypatch):
    rng = np.random.default_rng(1)
    (workspace / "data").mkdir()
    np.savez(workspace / "data" / "mine.npz", x_train=rng.random((200, 6)).round())
    run = train_run(
        None,
        "runs/mine",
        overrides=['data.name="data/mine.npz"', "train.epochs=1", *SETTINGS],
        progress=False,
    )
    assert run.spec.data.path == str((workspace / "data" / "mine.npz").resolve())
    elsewhere = workspace / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", "../runs/mine", "-k", "5"]) == 0
    assert main(["train", "--resume", "../runs/mine", "--epochs", "2", "--no-progress"]) == 0


def test_an_edited_spec_is_named_with_the_keys_that_differ(workspace, capsys):
    spec = workspace / "runs" / "keep" / "spec.toml"
    spec.write_text(spec.read_text().replace("latent_dim = 2", "latent_dim = 5"))
    assert main(["sample", "runs/keep", "-o", "s.png"]) == 2
    assert "model.latent_dim differ" in capsys.readouterr().err


def test_evaluate_json_is_strict_and_warns_when_unreliable(workspace, capsys):
    assert main(["evaluate", "runs/keep", "-k", "10", "--limit", "8", "-o", "k10.json"]) == 0
    out = capsys.readouterr().out
    assert "not computed (k̂ needs K >= 25)" in out
    text = (workspace / "k10.json").read_text()
    written = json.loads(text)
    assert "NaN" not in text and written["khat_bad_fraction"] is None
    assert len(written["per_point"]["log_px"]) == 8
    # beta = 0 leaves q(z|x) far narrower than the posterior: heavy-tailed weights.
    assert (
        main(
            ["train", "--out", "runs/narrow", "--epochs", "3", "--set", "train.kl.beta=0.0", *TINY]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["evaluate", "runs/narrow", "-k", "100", "--limit", "40"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pyrovae: warning: ")
    assert "lower bound of unknown tightness" in err[0]


@pytest.mark.parametrize("what", ["evaluate", "compare"])
def test_a_closed_pipe_still_writes_and_exits_quietly(workspace, what):
    """`| head` is not a failure: every command exits 0 without a word when its reader goes."""
    command = [sys.executable, "-m", "pyrovae.inference.cli"]
    if what == "evaluate":
        command += ["evaluate", "runs/keep", "-k", "30", "--limit", "10", "--force"]
        command += ["-o", "piped.json"]
    else:
        command += ["compare", "runs/keep", "runs/keep", "-k", "30", "--limit", "10"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the table comes, as with `| head`
    err = process.stderr.read().decode()
    assert process.wait() == 0, err
    assert err.strip() == ""
    if what == "evaluate":
        assert json.loads((workspace / "piped.json").read_text())["points"] == 10


def test_the_python_api_fails_early_and_casts(tmp_path):
    from pyrovae.guides import AmortizedGuide, DiagonalNormal

    class PlainPrior(torch.nn.Module):
        def forward(self):
            return torch.distributions.Independent(
                torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1
            )

    model = VAE(PlainPrior(), Decoder(2, 6, [8]), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(6, 2, hidden=[8]))
    assert model.sample(5).shape == (5, 6)  # a plain torch prior works in sample
    x = torch.rand(40, 6).round()
    with pytest.raises(PyrovaeError, match="does not exist"):
        fit(model, guide, x, epochs=1, callbacks=[Checkpointing(tmp_path / "missing")])
    fit(model, guide, x.double().numpy(), epochs=1)  # float64 NumPy
    result = log_marginal_likelihood(model, guide, x.double(), num_samples=5)
    assert torch.isfinite(result.log_px).all()
    with pytest.raises(ValueError, match="integer dtype"):
        log_marginal_likelihood(model, guide, x.to(torch.uint8), num_samples=5)
    assert math.isfinite(result.elbo.mean().item())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_a_read_only_run_is_refused_before_the_work(workspace, capsys):
    run = workspace / "runs" / "keep"
    os.chmod(run, 0o555)
    try:
        assert main(["evaluate", str(run), "-k", "5", "--limit", "3", "--force"]) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        os.chmod(run, 0o755)


def test_divergence_is_one_line_not_a_flood(tmp_path):
    """A NaN loss is one error line (no Pyro NaN warning per step); a run that ends finite
    but far worse than it was gets one warning line."""
    base = [sys.executable, "-m", "pyrovae.inference.cli", "train", "--epochs", "3", *TINY]
    nan = subprocess.run(
        [*base, "--out", str(tmp_path / "nan"), "--set", "train.lr=1e4"],
        capture_output=True,
        text=True,
    )
    assert nan.returncode == 2, nan.stderr
    lines = nan.stderr.strip().splitlines()
    assert len(lines) == 1 and "became NaN or infinite" in lines[0], nan.stderr


def test_a_diverging_bound_is_named_once():
    from pyrovae.inference.experiment.callbacks import divergence_message

    history = [{"epoch": e, "train_elbo": v} for e, v in enumerate([-120.0, -95.0, -90.0], 1)]
    assert divergence_message(history) is None  # learning
    history.append({"epoch": 4, "train_elbo": -2.6e19})
    message = divergence_message(history)
    assert "fell from -90 (epoch 3) to -2.6e+19" in message and "train.lr" in message
    noisy = [{"epoch": 1, "train_elbo": 30.0}, {"epoch": 2, "train_elbo": -60.0}]
    assert divergence_message(noisy) is None  # a bad epoch is not divergence
