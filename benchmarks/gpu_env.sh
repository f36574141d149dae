# Sourced by benchmarks/gpu.sh (and usable alone: `source benchmarks/gpu_env.sh`): makes the
# checkout runnable on a GPU machine without network. Installs the carried wheels of `.whl/`
# into /tmp/site where Pyro, zuko or ArviZ are missing, makes the checkout importable as
# `pyrovae`, puts a `pyrovae` launcher on PATH, and points the data variables at `.data/`.
if ! python3 -c "import pyro, zuko, arviz" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || return 1
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/pyrovae
  export PYTHONPATH=/tmp/site:/tmp/pkg
fi
export PYROVAE_DATA=${PYROVAE_DATA:-$PWD/.data}
export PYROVAE_TEST_MNIST=${PYROVAE_TEST_MNIST:-$PYROVAE_DATA/mnist.npz}
export PYTHONUNBUFFERED=1
if ! command -v pyrovae >/dev/null; then  # the checkout, not installed: a launcher for it
  mkdir -p /tmp/bin
  printf '#!/usr/bin/env python3\nimport sys\nfrom pyrovae.inference.cli import main\nsys.exit(main())\n' >/tmp/bin/pyrovae
  chmod +x /tmp/bin/pyrovae
  export PATH=/tmp/bin:$PATH
fi
