#!/usr/bin/env bash
# Every GPU figure of the README, in one command on a machine with a CUDA device.
#
#   bash benchmarks/gpu.sh [OUTDIR]      (default: $OUT, else runs/gpu)
#
# On a GPU machine without network (../shared/device/README.md), carry `.whl/` (from
# `bash ../shared/device/wheels.sh`) and `.data/mnist.npz`: the wheels are installed into
# /tmp/site and the checkout is importable as `pyrovae` without an install. Elsewhere the
# installed package and PYROVAE_DATA are used as they are.
#
# Steps: the `gpu` tests; the training overhead against plain PyTorch (batch 128 and 512); the
# marginal-likelihood throughput against the hand-written estimator; `pyrovae train` of the
# baseline config for 10 epochs and `pyrovae evaluate` of the whole MNIST test set at
# K = 5,000; a profile of that evaluation on 2,000 points. The log goes to OUTDIR/gpu.log.
set -uo pipefail
out=$(realpath -m "${1:-${OUT:-runs/gpu}}")
mkdir -p "$out"
source "$(dirname "$0")/gpu_env.sh" || exit 1
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUTDIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date -u +%H:%M:%S))" | tee -a "$out/gpu.log"
  local start=$SECONDS
  timeout "$limit" "$@" > >(tee -a "$out/gpu.log") 2>&1
  echo "== $name: exit $?, $((SECONDS - start)) s" | tee -a "$out/gpu.log"
}
runs=$(mktemp -d)

step env 60 bash -c 'nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, pyro, zuko, arviz; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"pyro\", pyro.__version__, \"zuko\", zuko.__version__, \"arviz\", arviz.__version__)"; nproc; date -u'
step gpu_tests 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests
step train_overhead 150 python3 benchmarks/train_overhead.py --device cuda --repeats 3
step train_overhead_512 90 python3 benchmarks/train_overhead.py --device cuda --repeats 3 --batch-size 512
step eval_throughput 180 python3 benchmarks/eval_throughput.py --device cuda --num-points 1000
step train 180 pyrovae train configs/mnist-standard-diagonal.toml --out "$runs/std" --epochs 10 --no-progress
step evaluate 300 pyrovae evaluate "$runs/std" -k 5000
step profile 180 python3 -c '
import cProfile, pstats, sys, time
from pyrovae.inference import evaluate_run
run = sys.argv[1]
evaluate_run(run, num_samples=5000, limit=200, write=False)  # warm-up
profile = cProfile.Profile()
start = time.perf_counter()
profile.runcall(evaluate_run, run, num_samples=5000, limit=2000, write=False)
print(f"2,000 points at K = 5,000: {time.perf_counter() - start:.1f} s under cProfile")
pstats.Stats(profile).sort_stats("cumulative").print_stats(45)
pstats.Stats(profile).sort_stats("tottime").print_stats(25)
' "$runs/std"
cp "$runs/std/evaluation.json" "$out/evaluation.json" 2>/dev/null
echo "== done ($(date -u +%H:%M:%S))"
