"""Training overhead of pyrovae against a plain hand-written PyTorch VAE loop.

Five arms train the same network (784-400-50, softplus, Bernoulli likelihood, Gaussian
guide, single-sample Monte Carlo ELBO, Adam, batch 128) on dynamically binarized MNIST, in
the same process, epochs interleaved (each arm runs in its own thread and waits for its turn,
so only one trains at a time):

- plain: a hand-written PyTorch loop computing the same estimator by formula, with
  ``torch.optim.Adam``'s default kernel, and the same with ``fused=True``;
- pyrovae eager: ``inference.fit(compile="off")`` on the Pyro model and guide (Trace_ELBO,
  its default optimizer: Adam with torch's fused kernel);
- pyrovae compiled: ``inference.fit(compile="on")``: the step traced once and compiled
  (``inference.algorithms.compiled``); its first epoch pays the trace and the compile;
- pyro example: the pattern of Pyro's own VAE example on the same modules (``pyro.module``,
  ``SVI`` with ``pyro.optim.Adam``, distribution validation on).

Every arm's first epoch is a warm-up. The ratios of median epoch times to the plain loop are
printed with their spread (min and max over the epochs), the compile time separately (the
compiled arm's first epoch less its median epoch), and the 10-epoch totals with it counted.

    .venv/bin/python benchmarks/train_overhead.py [--num-points 50000] [--repeats 5]
        [--batch-size 128] [--device cuda] [--data DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import pyro
import torch
from common import TakeTurns, Turns, find_mnist, interleaved
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam as PyroAdam
from torch import nn
from torch.nn import functional as F

from pyrovae.guides import AmortizedGuide, DiagonalNormal
from pyrovae.inference import fit
from pyrovae.inference.experiment.callbacks import BatchTransform
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


def pyrovae_run(
    model: VAE,
    guide: AmortizedGuide,
    x_train: torch.Tensor,
    batch: int,
    epochs: int,
    compile_mode: str,
    turns: Turns,
    name: str,
) -> list[float]:
    history = fit(
        model,
        guide,
        x_train,
        epochs=epochs,
        batch_size=batch,
        compile=compile_mode,
        callbacks=[TakeTurns(turns, name, epochs), BatchTransform(torch.bernoulli)],
    )
    return [row["seconds"] for row in history]


def loop_run(
    epoch: Callable[[torch.Tensor], float],
    x_train: torch.Tensor,
    epochs: int,
    turns: Turns,
    name: str,
) -> list[float]:
    seconds = []
    for i in range(epochs):
        turns.wait(name)
        seconds.append(epoch(x_train))
        turns.pass_on(name, finished=i == epochs - 1)
    return seconds


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
    plain = PlainVAE().to(device)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-3)
    # The reference with the optimizer pyrovae defaults to: what of the gain is the kernel.
    plain_fused = PlainVAE().to(device)
    plain_fused.load_state_dict(plain.state_dict())
    plain_fused_opt = torch.optim.Adam(plain_fused.parameters(), lr=1e-3, fused=True)
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

    compiled_model, compiled_guide = modules()
    compiled_model.load_state_dict(model.state_dict())
    compiled_guide.load_state_dict(guide.state_dict())
    epochs = args.repeats + 1
    arms: dict[str, Callable[[Turns, str], list[float]]] = {
        "plain PyTorch": lambda turns, name: loop_run(
            lambda x: plain_epoch(plain, plain_opt, x, args.batch_size),
            x_train,
            epochs,
            turns,
            name,
        ),
        "plain, fused Adam": lambda turns, name: loop_run(
            lambda x: plain_epoch(plain_fused, plain_fused_opt, x, args.batch_size),
            x_train,
            epochs,
            turns,
            name,
        ),  # fmt: skip
        "pyrovae eager": lambda turns, name: pyrovae_run(
            model, guide, x_train, args.batch_size, epochs, "off", turns, name
        ),
        "pyrovae compiled": lambda turns, name: pyrovae_run(
            compiled_model, compiled_guide, x_train, args.batch_size, epochs, "on", turns, name
        ),
        "Pyro example pattern": lambda turns, name: loop_run(
            lambda x: pyro_example_epoch(svi, x, args.batch_size), x_train, epochs, turns, name
        ),
    }
    results = interleaved(arms)
    first = {name: values[0] for name, values in results.items()}
    times = {name: values[1:] for name, values in results.items()}
    reference = statistics.median(times["plain PyTorch"])
    print(
        f"points per epoch: {len(x_train)}, batch {args.batch_size}, device {device}"
        f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
        f"threads {torch.get_num_threads()}, torch {torch.__version__}, pyro {pyro.__version__}, "
        f"{args.repeats} timed epochs each after a warm-up, interleaved"
    )
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:<22} epoch s: {', '.join(f'{t:.2f}' for t in values)}   ratio "
            f"{median / reference:.3f} (spread {min(values) / reference:.3f}-"
            f"{max(values) / reference:.3f})"
        )
    compiled = statistics.median(times["pyrovae compiled"])
    compile_s = first["pyrovae compiled"] - compiled
    print(f"compile time (first compiled epoch less its median): {compile_s:.1f} s")
    for name in ("plain PyTorch", "plain, fused Adam", "pyrovae eager", "pyrovae compiled"):
        total = 10 * statistics.median(times[name]) + (
            compile_s if name == "pyrovae compiled" else 0
        )
        print(f"10 epochs, {name}: {total:.1f} s (ratio {total / (10 * reference):.3f})")


if __name__ == "__main__":
    main()
