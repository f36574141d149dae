"""Training overhead of pyrovae against a plain hand-written PyTorch VAE loop.

Three arms train the same network (784-400-50, softplus, Bernoulli likelihood, Gaussian
guide, single-sample Monte Carlo ELBO, Adam, batch 128) on dynamically binarized MNIST, in
the same process, epochs interleaved:

- plain: a hand-written PyTorch loop computing the same estimator by formula;
- pyrovae: ``inference.fit`` on the Pyro model and guide (Trace_ELBO, torch.optim);
- pyro example: the pattern of Pyro's own VAE example on the same modules (``pyro.module``,
  ``SVI`` with ``pyro.optim.Adam``, distribution validation on).

The ratios of median epoch times to the plain loop are printed.

    .venv/bin/python benchmarks/train_overhead.py [--num-points 50000] [--repeats 3]
        [--batch-size 128] [--device cuda] [--data DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import pyro
import torch
from common import find_mnist
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam as PyroAdam
from torch import nn
from torch.nn import functional as F

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import fit
from pyrovae.model import VAE, Bernoulli, Decoder, StandardNormal

LATENT, HIDDEN = 50, 400


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_epoch(
    vae: PlainVAE, optimizer: torch.optim.Optimizer, x_train: torch.Tensor, batch: int
) -> float:
    n = x_train.shape[0]
    order = torch.randperm(n, device=x_train.device)
    synchronize(x_train.device)
    start_time = time.perf_counter()
    for start in range(0, n, batch):
        x = torch.bernoulli(x_train[order[start : start + batch]])
        loss = vae.loss(x)
        optimizer.zero_grad(set_to_none=True)
        (loss / x.shape[0]).backward()
        optimizer.step()
    synchronize(x_train.device)
    return time.perf_counter() - start_time


def pyrovae_epoch(
    model: VAE,
    guide: AmortizedGuide,
    optimizer: torch.optim.Optimizer,
    x_train: torch.Tensor,
    batch: int,
) -> float:
    history = fit(
        model,
        guide,
        x_train,
        epochs=1,
        batch_size=batch,
        optimizer=optimizer,
        transform=torch.bernoulli,
        device=str(x_train.device),
        seed=None,
        progress=False,
    )
    return history[-1]["seconds"]


def pyro_example_epoch(svi: SVI, x_train: torch.Tensor, batch: int) -> float:
    """The loop of Pyro's examples/vae/vae.py: SVI.step per batch, validation on."""
    n = x_train.shape[0]
    order = torch.randperm(n, device=x_train.device)
    synchronize(x_train.device)
    start_time = time.perf_counter()
    with pyro.validation_enabled(True):
        for start in range(0, n, batch):
            svi.step(torch.bernoulli(x_train[order[start : start + batch]]))
    synchronize(x_train.device)
    return time.perf_counter() - start_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-points", type=int, default=50_000, help="training points per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="epochs of each, interleaved")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    parser.add_argument("--data", help="mnist.npz or its folder (default: PYROVAE_DATA)")
    args = parser.parse_args()
    mnist = find_mnist(args.data)
    if mnist is None:
        sys.exit("skipped: mnist.npz not found; pass --data or set PYROVAE_DATA")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x_train = torch.from_numpy(
        np.load(mnist)["x_train"][: args.num_points].reshape(-1, 784) / 255.0
    ).to(device, torch.float32)

    def modules() -> tuple[VAE, AmortizedGuide]:
        model = VAE(StandardNormal(LATENT), Decoder(LATENT, 784, [HIDDEN], "softplus"), Bernoulli())
        return model, AmortizedGuide(
            DiagonalNormal(784, LATENT, hidden=[HIDDEN], activation="softplus")
        )

    torch.manual_seed(0)
    model, guide = modules()
    model.to(device)
    guide.to(device)
    pyro_opt = torch.optim.Adam(list(model.parameters()) + list(guide.parameters()), lr=1e-3)
    plain = PlainVAE().to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    example_model, example_guide = modules()
    example_model.to(device)
    example_guide.to(device)

    def example_model_fn(x: torch.Tensor) -> None:
        pyro.module("decoder", example_model)
        example_model(x)

    def example_guide_fn(x: torch.Tensor) -> None:
        pyro.module("encoder", example_guide)
        example_guide(x)

    pyro.clear_param_store()
    svi = SVI(example_model_fn, example_guide_fn, PyroAdam({"lr": 1e-3}), Trace_ELBO())

    arms = {
        "plain PyTorch": lambda x: plain_epoch(plain, plain_opt, x, args.batch_size),
        "pyrovae fit": lambda x: pyrovae_epoch(model, guide, pyro_opt, x, args.batch_size),
        "Pyro example pattern": lambda x: pyro_example_epoch(svi, x, args.batch_size),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    for run in arms.values():  # warm-up
        run(x_train[:2048])
    for _ in range(args.repeats):
        for name, run in arms.items():
            times[name].append(run(x_train))
    reference = statistics.median(times["plain PyTorch"])
    print(
        f"points per epoch: {len(x_train)}, batch {args.batch_size}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, pyro {pyro.__version__}"
    )
    for name, values in times.items():
        ratio = statistics.median(values) / reference
        print(f"{name:<22} epoch s: {', '.join(f'{t:.2f}' for t in values)}   ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
