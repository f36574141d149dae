"""Two processes under torchrun on the CPU (gloo): one run, written once, the same parameters
on both ranks (a flow guide whose flow waits out a one-epoch guide warm-up without gradients),
and a sharded evaluation equal to the single-process one per point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from pyrovae.inference import evaluate_run, load_run

SMALL = [
    "model.latent_dim=2",
    "model.decoder.hidden=[16]",
    "guide.encoder.hidden=[16]",
    "train.batch_size=64",
    "train.epochs=2",
]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


FLOW_GUIDE_WARMED_UP = ['guide.encoder.kind="flow"', "train.guide_warmup=1"]
"""A flow guide whose flow gets no gradient in the first epoch: DDP must expect that."""


def test_two_processes_train_one_run_and_shard_its_evaluation(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, torch
            from pyrovae.inference import train_run

            run = train_run(None, "run", overrides={[*SMALL, *FLOW_GUIDE_WARMED_UP]!r}, progress=False)
            state = {{**run.model.state_dict(), **run.guide.state_dict()}}
            torch.save({{"state": state, "history": run.history}}, f"rank{{os.environ['RANK']}}.pt")
            """
        )
    )
    done = torchrun(str(script), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "rank0.pt",
        "rank1.pt",
        "run",
        "train.py",
    ]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0)
    # Validation is reduced across ranks: both saw the same history (timings aside).
    # NaN (a flow guide has no mean for the active units) compares as None.
    untimed = [
        [
            {k: None if v != v else v for k, v in h.items() if k not in ("seconds", "images_per_s")}
            for h in r["history"]
        ]
        for r in ranks
    ]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 2
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header and two epochs, written once
    saved = load_run(tmp_path / "run")
    for key, value in saved.model.state_dict().items():
        torch.testing.assert_close(value, ranks[0]["state"][key])

    done = torchrun(
        "-m",
        "pyrovae.inference.cli",
        "evaluate",
        "run",
        "-k",
        "30",
        "--limit",
        "250",
        "-o",
        "sharded.json",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("writing sharded.json") == 1  # rank 0 prints and writes
    sharded = json.loads((tmp_path / "sharded.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks' arithmetic, for equal floating-point results
    try:
        single = evaluate_run(tmp_path / "run", num_samples=30, limit=250, write=False)
    finally:
        torch.set_num_threads(threads)
    assert sharded["points"] == 250
    torch.testing.assert_close(
        torch.tensor(sharded["per_point"]["log_px"], dtype=torch.float64),
        single.result.log_px,
        rtol=0,
        atol=1e-5,
    )


def test_a_bad_input_under_torchrun_is_one_line_that_torchruns_summary_names(tmp_path):
    """Each rank refuses with pyrovae's one line before any work; torchrun then prints its own
    failure summary (and exits 1), whose root cause is that line rather than a pointer to
    its documentation, and nothing is written."""
    pyrovae = Path(sys.executable).with_name("pyrovae")
    done = torchrun(
        str(pyrovae), "train", "--out", "run", "--set", "train.batch_size=0", cwd=tmp_path
    )
    line = "pyrovae: error: train.batch_size must be an integer >= 1, got 0"
    assert done.returncode != 0
    ours = [text for text in done.stderr.splitlines() if text.startswith("pyrovae:")]
    assert ours and set(ours) == {line}
    assert f"traceback : {line}" in done.stderr
    package = Path(__file__).parents[1]
    for part in ("inference", "model", "guides"):  # no traceback through pyrovae's code
        assert f'File "{package / part}' not in done.stderr
    assert not (tmp_path / "run").exists()
