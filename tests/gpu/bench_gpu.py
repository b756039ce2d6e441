"""GPU figures: one process, stock mlx-lm pipelining and ppwrap on 2 ranks.

Usage: python tests/gpu/bench_gpu.py OUT_DIR [--small]

Writes a random-weight bfloat16 qwen3_moe checkpoint with Qwen3's vocabulary
(151936 tokens) and a 2048-wide hidden state, so that the output head is a
real share of every token; times single-process mlx-lm decoding on it; then
runs ``ppwrap bench`` on it (stock mlx-lm, ppwrap with the head kept and
elided, alternating, medians) on 2 ranks. ``--small`` shrinks the model (float32), to
check the script on a CPU. docs/gpu.md has the results.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx

from ppwrap.bench.pipeline import MOE_CONFIG

# ppwrap bench's default MoE (Qwen3's vocabulary) at a width where the head
# is a real share of each token.
CONFIG = {
    **{k: v for k, v in MOE_CONFIG.items() if k != "ppwrap_random_weights"},
    "hidden_size": 2048,
    "num_hidden_layers": 8,
    "intermediate_size": 6144,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 16,
    "moe_intermediate_size": 768,
}
SMALL = {"hidden_size": 256, "head_dim": 64, "moe_intermediate_size": 256, "vocab_size": 32000}


def write(path: Path, config: dict[str, object], dtype: mx.Dtype) -> Path:
    from mlx.utils import tree_map
    from mlx_lm.models import qwen3_moe
    from mlx_lm.utils import save_config, save_model

    from ppwrap.models.gguf import _train_tokenizer

    mx.random.seed(0)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(config))
    model.update(tree_map(lambda w: w.astype(dtype), model.parameters()))
    mx.eval(model.parameters())
    save_model(path, model)
    _train_tokenizer(path)
    save_config(dict(config), path / "config.json")
    return path


def one_process(path: Path, tokens: int, repeats: int) -> dict[str, float]:
    from mlx_lm import load, stream_generate

    model, tok = load(str(path))
    resident = mx.get_active_memory()
    prompt = list(range(1, 65))
    rates = []
    for _ in range(repeats + 1):  # the first run warms the kernels up
        last = list(stream_generate(model, tok, prompt, max_tokens=tokens))[-1]
        rates.append(last.generation_tps)
    tps = statistics.median(rates[1:])
    return {"decode_ms_per_token": 1000 / tps, "tokens_per_s": tps, "resident_bytes": resident}


def main() -> None:
    out = Path(sys.argv[1])
    small = "--small" in sys.argv
    out.mkdir(parents=True, exist_ok=True)
    config = {**CONFIG, **(SMALL if small else {})}
    # MLX's CPU has no bfloat16 MoE matmul: the small check runs in float32.
    dtype = mx.float32 if small else mx.bfloat16
    path = write(out / "qwen3_moe", config, dtype)
    report: dict[str, object] = {
        "config": config,
        "dtype": str(dtype),
        "device": str(mx.default_device()),
    }
    tic = time.perf_counter()
    report["one_process"] = one_process(path, tokens=64, repeats=3)
    report["one_process_s"] = time.perf_counter() - tic
    print(json.dumps(report, indent=1), flush=True)
    (out / "one_process.json").write_text(json.dumps(report, indent=1))
    bench = [sys.executable, "-m", "ppwrap", "bench", "--model", str(path), "--ranks", "2"]
    bench += ["--tokens", "64", "--repeats", "3", "--out", str(out / "bench"), "--timeout", "300"]
    sys.exit(subprocess.call(bench))


if __name__ == "__main__":
    main()
