#!/usr/bin/env bash
# On the GPU machine, from the project root, once .gpu/part2/install.sh has run
# (see docs/gpu.md): versions, the GPU suite, then (with --bench) the figures.
# Everything it prints is also written under $OUT.
set -o pipefail
export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ppwrap-gpu}
mkdir -p "$OUT"
python3 -c "import importlib.metadata as m, mlx.core as mx; print('mlx', mx.__version__, 'mlx-lm', m.version('mlx-lm'), 'ppwrap', m.version('ppwrap'), mx.default_device(), mx.cuda.is_available())" | tee "$OUT/versions.txt"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/versions.txt"
if [ "${1:-}" = "--bench" ]; then
  timeout 560 python3 tests/gpu/bench_gpu.py "$OUT/bench" 2>&1 | tee "$OUT/bench.log"
else
  timeout 540 python3 -m pytest tests/gpu -v -p no:cacheprovider -o cache_dir=/tmp/pc 2>&1 | tee "$OUT/gpu-tests.log"
fi
