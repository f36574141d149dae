"""Throughput and memory of ``log_marginal_likelihood`` against a hand-written estimator.

Trains a small MNIST VAE (784-400-50, Bernoulli pixels) for a few epochs, then estimates
log p(x) on test images twice in the same process, interleaved: through
``inference.algorithms.marginal.log_marginal_likelihood`` and through a plain batched PyTorch
importance sampler (encoder, rsample K x B, BCE-with-logits and Gaussian log densities by
formula, logsumexp). Prints importance samples per second for both and their ratio
(target >= 0.9), the peak memory of each at K=500 and K=5000 (each in a fresh
subprocess), and the projected time for the 10,000-image test set at K=5000.

Usage:
    .venv/bin/python benchmarks/eval_throughput.py [--epochs 1] [--num-points 100]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import torch
from common import find_mnist
from torch import Tensor
from torch.nn.functional import binary_cross_entropy_with_logits

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import log_marginal_likelihood
from pyrovae.model import VAE, Bernoulli, Decoder, StandardNormal

MNIST = find_mnist()
LATENT_DIM, HIDDEN, FEATURES = 50, [400], 784
TEST_SET_SIZE, FULL_K = 10_000, 5000
MEMORY_KS = (500, 5000)
REFERENCE_PAIRS_PER_PASS = 4096
LOG_2PI = math.log(2 * math.pi)


def build() -> tuple[VAE, AmortizedGuide]:
    """The benchmark's VAE and its amortized diagonal-Gaussian guide."""
    vae = VAE(StandardNormal(LATENT_DIM), Decoder(LATENT_DIM, FEATURES, HIDDEN), Bernoulli())
    return vae, AmortizedGuide(DiagonalNormal(FEATURES, LATENT_DIM, hidden=HIDDEN))


def load_images(split: str, device: torch.device) -> Tensor:
    """Grey levels in [0, 1], flattened to (N, 784)."""
    with np.load(MNIST) as data:
        images = data[f"x_{split}"]
    return torch.from_numpy(images.reshape(len(images), -1)).to(device, torch.float32) / 255


def binarized_test_set(device: torch.device, num_points: int) -> Tensor:
    """The first test images, binarized once with a fixed seed (Burda et al., 2016)."""
    grey = load_images("test", torch.device("cpu"))[:num_points]
    return torch.bernoulli(grey, generator=torch.Generator().manual_seed(0)).to(device)


def train(vae: VAE, guide: AmortizedGuide, x_train: Tensor, epochs: int, batch_size: int) -> float:
    """Plain Adam on the Trace_ELBO module, dynamic binarization; returns the last ELBO."""
    loss_fn = pyro.infer.Trace_ELBO()(vae, guide)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)
    running = math.nan
    for _ in range(epochs):
        for batch in x_train[torch.randperm(len(x_train))].split(batch_size):
            loss = loss_fn(torch.bernoulli(batch)) / len(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            running = loss.item() if math.isnan(running) else 0.98 * running + 0.02 * loss.item()
    return -running


@torch.no_grad()
def reference_log_px(
    vae: VAE, guide: AmortizedGuide, x: Tensor, num_samples: int, pairs: int
) -> Tensor:
    """Hand-written importance sampler for this VAE: log p̂(x) per row, K draws each."""
    batch = max(1, min(len(x), pairs // num_samples))
    chunk = min(num_samples, max(1, pairs // batch))
    estimates = []
    for x_block in x.split(batch):
        q = guide.encoder(x_block).base_dist
        log_det = q.scale.log().sum(-1)
        log_weights = []
        for start in range(0, num_samples, chunk):
            eps = torch.randn(min(chunk, num_samples - start), *q.loc.shape, device=x.device)
            z = q.loc + q.scale * eps
            logits = vae.decoder(z)
            log_lik = -binary_cross_entropy_with_logits(
                logits, x_block.expand_as(logits), reduction="none"
            ).sum(-1)
            log_prior = -0.5 * (z.square() + LOG_2PI).sum(-1)
            log_q = -0.5 * (eps.square() + LOG_2PI).sum(-1) - log_det
            log_weights.append(log_lik + log_prior - log_q)
        estimates.append(torch.logsumexp(torch.cat(log_weights), 0) - math.log(num_samples))
    return torch.cat(estimates)


def ours_log_px(
    vae: VAE, guide: AmortizedGuide, x: Tensor, num_samples: int, compile: str = "off"
) -> Tensor:
    return log_marginal_likelihood(vae, guide, x, num_samples, compile=compile).log_px


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    runs: dict[str, Callable[[], Tensor]], repeats: int, device: torch.device
) -> tuple[dict[str, list[float]], dict[str, Tensor]]:
    """Seconds per run for each estimator, alternating them, after one warm-up each (its
    seconds are under the key ``(name, "warm-up")``: the compiled arm's includes its compile)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    results = {}
    for name, run in runs.items():
        synchronize(device)
        start = time.perf_counter()
        results[name] = run()
        synchronize(device)
        seconds[name, "warm-up"] = [time.perf_counter() - start]
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            results[name] = run()
            synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds, results


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: peak memory of one estimator run, printed as one JSON line."""
    import arviz  # noqa: F401  (ours imports it on first use; count it in the baseline)

    device = torch.device(args.device)
    vae, guide = build()
    state = torch.load(args.memory_child, weights_only=True)
    vae.load_state_dict(state["vae"])
    guide.load_state_dict(state["guide"])
    vae.to(device)
    guide.to(device)
    x = binarized_test_set(device, args.memory_points)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
    else:
        baseline = reset_peak_rss()
    if args.estimator == "ours":
        ours_log_px(vae, guide, x, args.num_samples)
    else:
        reference_log_px(vae, guide, x, args.num_samples, REFERENCE_PAIRS_PER_PASS)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = peak_rss()
    print(json.dumps({"baseline": baseline, "peak": peak}))


def reset_peak_rss() -> int:
    """Resets the RSS high-water mark (Linux ``clear_refs``); returns the current RSS in bytes.

    Without the reset, transient peaks of the set-up (imports, loading) would hide the
    estimator's own peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_rss() -> int:
    """The RSS high-water mark in bytes since :func:`reset_peak_rss`.

    Read from ``VmHWM``: ``getrusage`` also remembers the parent's RSS from before ``exec``.
    """
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        line = next(line for line in status if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(args: argparse.Namespace, state_path: str) -> dict[tuple[str, int], dict]:
    out = {}
    for num_samples in MEMORY_KS:
        for estimator in ("ours", "reference"):
            command = [
                sys.executable, __file__, "--memory-child", state_path,
                "--estimator", estimator, "--num-samples", str(num_samples),
                "--memory-points", str(args.memory_points), "--device", args.device,
            ]  # fmt: skip
            if args.threads:
                command += ["--threads", str(args.threads)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            out[estimator, num_samples] = json.loads(line.strip().splitlines()[-1])
    return out


def mib(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:,.0f} MiB"


def estimator_runs(
    vae: VAE, guide: AmortizedGuide, x: Tensor, num_samples: int
) -> dict[str, Callable[[], Tensor]]:
    return {
        "log_marginal_likelihood": lambda: ours_log_px(vae, guide, x, num_samples),
        "compiled": lambda: ours_log_px(vae, guide, x, num_samples, "on"),
        "hand-written reference": lambda: reference_log_px(
            vae, guide, x, num_samples, REFERENCE_PAIRS_PER_PASS
        ),
    }


def report_throughput(
    vae: VAE, guide: AmortizedGuide, x: Tensor, num_samples: int, repeats: int
) -> None:
    runs = estimator_runs(vae, guide, x, num_samples)
    seconds, results = time_interleaved(runs, repeats, x.device)
    print(f"throughput on {len(x)} test images, K={num_samples}, {repeats} interleaved runs:")
    pairs = len(x) * num_samples
    for name in runs:
        times = seconds[name]
        print(
            f"  {name:<24} median {pairs / statistics.median(times):>9,.0f} samples/s, "
            f"best {pairs / min(times):>9,.0f}   mean log p(x) {results[name].mean():8.2f} nats"
        )
    reference = seconds["hand-written reference"]
    for name in ("log_marginal_likelihood", "compiled"):
        ours = seconds[name]
        ratios = sorted(r / o for r, o in zip(reference, ours, strict=True))
        print(
            f"  ratio {name} / reference   median {statistics.median(reference) / statistics.median(ours):.2f} "
            f"(target >= 1.10); paired runs {' '.join(f'{r:.2f}' for r in ratios)}"
        )
    compile_s = seconds["compiled", "warm-up"][0] - statistics.median(seconds["compiled"])
    print(f"  trace and compile (first compiled run less its median): {compile_s:.1f} s")


def report_memory(args: argparse.Namespace, vae: VAE, guide: AmortizedGuide) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        state_path = str(Path(tmp) / "state.pt")
        torch.save({"vae": vae.state_dict(), "guide": guide.state_dict()}, state_path)
        memory = measure_memory(args, state_path)
    kind = "GPU max_memory_allocated" if args.device.startswith("cuda") else "RSS high-water"
    print(f"peak memory above baseline ({kind}, fresh subprocess, {args.memory_points} images):")
    for num_samples in MEMORY_KS:
        cells = []
        for estimator in ("ours", "reference"):
            m = memory[estimator, num_samples]
            cells.append(f"{estimator} +{mib(m['peak'] - m['baseline'])} (peak {mib(m['peak'])})")
        print(f"  K={num_samples:<5} " + ", ".join(cells))


def report_projection(vae: VAE, guide: AmortizedGuide, x: Tensor, repeats: int) -> None:
    seconds, _ = time_interleaved(estimator_runs(vae, guide, x, FULL_K), repeats, x.device)
    print(
        f"projected time for the {TEST_SET_SIZE:,}-image test set at K={FULL_K} "
        f"(median of {repeats} interleaved runs on {len(x)} images):"
    )
    for name, times in seconds.items():
        if isinstance(name, tuple):
            continue
        per_point = statistics.median(times) / len(x)
        print(
            f"  {name:<24} {per_point * TEST_SET_SIZE / 60:6.1f} min   "
            f"({FULL_K / per_point:,.0f} samples/s)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    parser.add_argument("--num-points", type=int, default=100, help="test images timed")
    parser.add_argument("--num-samples", type=int, default=500, help="K for the timing")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per estimator")
    parser.add_argument("--memory-points", type=int, default=10, help="images at K=5000")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size")
    parser.add_argument("--train-points", type=int, default=60_000, help="training images used")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--estimator", choices=["ours", "reference"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        return memory_child(args)
    if MNIST is None:
        print("skipped: mnist.npz not found; set PYROVAE_DATA to its folder")
        return
    device = torch.device(args.device)
    torch.manual_seed(0)
    print(
        f"device {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, "
        f"pyro {pyro.__version__}, load average {os.getloadavg()[0]:.2f} on "
        f"{os.cpu_count()} CPUs at start"
    )
    vae, guide = build()
    vae.to(device)
    guide.to(device)
    x_train = load_images("train", device)[: args.train_points]
    start = time.perf_counter()
    elbo = train(vae, guide, x_train, args.epochs, args.batch_size)
    print(
        f"trained {args.epochs} epoch(s) on {len(x_train):,} images in "
        f"{time.perf_counter() - start:.1f} s; training ELBO {elbo:.1f} nats/image"
    )
    x = binarized_test_set(device, args.num_points)
    report_throughput(vae, guide, x, args.num_samples, args.repeats)
    report_memory(args, vae, guide)
    report_projection(vae, guide, x[: args.memory_points], min(args.repeats, 3))
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
