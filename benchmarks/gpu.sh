#!/usr/bin/env bash
# keras_vit on a GPU through JAX and torch, beside timm + torch.compile (issue 12, goal 4).
#
# ViT-B/16 and ViT-L/16 at 224 px in bf16: inference and SGD training-step img/s
# for keras_vit on KERAS_BACKEND=jax (XLA), keras_vit on KERAS_BACKEND=torch, and
# timm with torch.compile + autocast, at one batch on one card; a table with the
# median, min and max over rounds, and the ratio keras_vit-JAX / timm+compile.
# At most about 5 minutes (a time guard, --budget 280 s by default).
#
# From the repository root:
#   bash benchmarks/gpu.sh                       # the device machine: cuda if present, else cpu
#   bash benchmarks/gpu.sh --tiny                # CPU smoke test: a tiny ViT at 32 px
#   bash benchmarks/gpu.sh --models B16 --batch 128 --rounds 7
#   bash benchmarks/gpu.sh --fetch-wheels        # here, with pip and the registry: keras & co into .whl/
# Other options: see `python benchmarks/gpu_speed.py --help`.
#
# The device image has JAX, PyTorch and timm but not keras (nor TensorFlow, which
# keras_vit does not need for its models). `--fetch-wheels` downloads keras and
# the dependencies that image lacks, for its Python 3.12, into .whl/ (ignored by
# git); carry .whl and this script installs them into /tmp/site when keras is
# missing. keras_vit itself comes from the repository root (PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    # keras's own needs that the device image lacks: namex and optree (absl-py,
    # numpy, rich, h5py, ml-dtypes and packaging are there).
    KERAS_VERSION=${KERAS_VERSION:-$($PY -c 'import importlib.metadata as m; print(m.version("keras"))' 2>/dev/null || echo 3.15.1)}
    mkdir -p .whl
    $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        -d .whl "keras==$KERAS_VERSION" namex optree
    ls -l .whl
    exit 0
fi

if ! $PY -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("keras") is None)'; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu.sh: keras is not installed; installing the carried wheels from .whl/ into /tmp/site"
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "gpu.sh: keras is not installed and no wheels are in .whl/ (run 'bash benchmarks/gpu.sh --fetch-wheels' where pip works, then carry .whl); the keras_vit rows will say so"
    fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi -L || true
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
    # On the device machine: each worker's log and this table come back from $OUT.
    $PY benchmarks/gpu_speed.py --log-dir "$OUT" "$@" 2>&1 | tee "$OUT/gpu.log"
else
    exec $PY benchmarks/gpu_speed.py "$@"
fi
