#!/usr/bin/env bash
# On the GPU machine, from the project root, once .gpu/part2/install.sh has run
# (see docs/gpu.md): versions, the GPU suite, then (with --bench) the figures.
# Everything it prints is also written under $OUT.
set -o pipefail
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ppwrap-gpu}
mkdir -p "$OUT"
# Run from a copy of the tests: in the project root, `python -m` would import
# the source tree's ppwrap, which has no ppwrap.adapters (the wheel maps it).
rm -rf /tmp/ppwrap-run && mkdir -p /tmp/ppwrap-run
cp -r tests pyproject.toml /tmp/ppwrap-run/ && cd /tmp/ppwrap-run || exit 1
python3 -c "import importlib.metadata as m, mlx.core as mx; print('mlx', mx.__version__, 'mlx-lm', m.version('mlx-lm'), 'ppwrap', m.version('ppwrap'), mx.default_device(), mx.cuda.is_available())" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/versions.txt"
if [ "${1:-}" = "--bench" ]; then
  timeout 560 python3 tests/gpu/bench_gpu.py "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
else
  timeout 540 python3 -m pytest tests/gpu -v -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests.log"
fi
