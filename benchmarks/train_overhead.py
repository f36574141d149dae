"""Training overhead of pyrovae against a plain hand-written PyTorch VAE loop.

Both train the same network (784-400-50, softplus, Bernoulli likelihood, Gaussian guide,
single-sample Monte Carlo ELBO, Adam, batch 128) on dynamically binarized MNIST, in the same
process, epochs interleaved, and the ratio of the median epoch times is printed.

    .venv/bin/python benchmarks/train_overhead.py [--num-points 50000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from guides import AmortizedGuide, DiagonalNormal
from inference import fit
from model import VAE, Bernoulli, MLPDecoder, StandardNormal

MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist.npz"
LATENT, HIDDEN, BATCH = 50, 400, 128


class PlainVAE(nn.Module):
    """The reference: the same networks and estimator, written directly in PyTorch."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(784, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 2 * LATENT)
        )
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, HIDDEN), nn.Softplus(), nn.Linear(HIDDEN, 784)
        )

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        loc, raw = self.encoder(x).chunk(2, dim=-1)
        scale = F.softplus(raw) + 1e-4
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        log_q = (-0.5 * eps**2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum()
        log_p = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum()
        nll = F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        return nll + log_q - log_p


def plain_epoch(vae: PlainVAE, optimizer: torch.optim.Optimizer, x_train: torch.Tensor) -> float:
    n = x_train.shape[0]
    order = torch.randperm(n)
    start_time = time.perf_counter()
    for start in range(0, n, BATCH):
        x = torch.bernoulli(x_train[order[start : start + BATCH]])
        loss = vae.loss(x)
        optimizer.zero_grad(set_to_none=True)
        (loss / x.shape[0]).backward()
        optimizer.step()
    return time.perf_counter() - start_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=50_000, help="training points per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each, interleaved")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not MNIST.is_file():
        sys.exit(f"skipped: MNIST not found at {MNIST}")
    torch.set_num_threads(args.threads)
    x_train = torch.from_numpy(
        np.load(MNIST)["x_train"][: args.num_points].reshape(-1, 784) / 255.0
    ).float()

    torch.manual_seed(0)
    model = VAE(StandardNormal(LATENT), MLPDecoder(LATENT, 784, [HIDDEN], "softplus"), Bernoulli())
    guide = AmortizedGuide(DiagonalNormal(784, LATENT, [HIDDEN], "softplus"))
    params = list(model.parameters()) + list(guide.parameters())
    pyro_opt = torch.optim.Adam(params, lr=1e-3)
    plain = PlainVAE()
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)

    # One warm-up epoch of each, then interleaved timed epochs.
    plain_epoch(plain, plain_opt, x_train[:2048])
    fit(
        model,
        guide,
        x_train[:2048],
        epochs=1,
        optimizer=pyro_opt,
        transform=torch.bernoulli,
        seed=None,
        progress=False,
    )
    pyro_times, plain_times = [], []
    for _ in range(args.repeats):
        plain_times.append(plain_epoch(plain, plain_opt, x_train))
        history = fit(
            model,
            guide,
            x_train,
            epochs=1,
            optimizer=pyro_opt,
            transform=torch.bernoulli,
            device="cpu",
            seed=None,
            progress=False,
        )
        pyro_times.append(history[-1]["seconds"])
    ratio = statistics.median(pyro_times) / statistics.median(plain_times)
    print(f"points per epoch: {len(x_train)}, batch {BATCH}, threads {torch.get_num_threads()}")
    print("plain PyTorch epoch s: " + ", ".join(f"{t:.2f}" for t in plain_times))
    print("pyrovae fit epoch s:   " + ", ".join(f"{t:.2f}" for t in pyro_times))
    print(f"ratio pyrovae / plain (median epoch time): {ratio:.3f}")


if __name__ == "__main__":
    main()
