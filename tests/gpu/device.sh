#!/usr/bin/env bash
# On the GPU machine, from the project root, once .gpu/part2/install.sh has run
# (see docs/gpu.md): versions, then the GPU suite, or with --bench the figures, --links the
# link-latency figures (arguments after it go to `ppwrap bench`: `--links --device cpu`
# gives every rank cores of its own instead of a share of the one GPU), --probe the hop
# probe's. The whole suite takes longer than one device call (600 s): `--tests EXPR` runs
# the tests pytest's -k EXPR picks, so two calls split it (`--tests "not boundaries"`,
# then `--tests boundaries`).
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
elif [ "${1:-}" = "--links" ]; then
  # The link-latency figures with a core per rank (this host has 16).
  python3 -c "import sys; sys.path.insert(0, 'tests'); from pathlib import Path; \
from families import write_model_folder; write_model_folder('qwen2', Path('/tmp/tinyq/qwen2-tiny'))"
  timeout 560 ppwrap bench --link-delay 1 5 --ranks 2 3 4 --tokens 32 --repeats 5 \
    --model /tmp/tinyq/qwen2-tiny --timeout 240 --out "$OUT/links" "${@:2}" 2>&1 |
    tee "$OUT/links.log"
elif [ "${1:-}" = "--probe" ]; then
  # A bare ring's hop for each way of waiting (one launch per rank count and delay).
  for n in 2 3 4; do
    PROBE_MODES="${PROBE_MODES:-gpu both sync fwake fboth}" timeout 180 python3 tests/gpu/hop_probe.py "$n" 1 5 2>&1 |
      tee -a "$OUT/probe.log"
  done
elif [ "${1:-}" = "--tests" ]; then
  timeout 540 python3 -m pytest tests/gpu -v -p no:cacheprovider --durations=10 -k "$2" 2>&1 |
    tee -a "$OUT/gpu-tests.log"
else
  timeout 540 python3 -m pytest tests/gpu -v -p no:cacheprovider --durations=10 2>&1 |
    tee "$OUT/gpu-tests.log"
fi
