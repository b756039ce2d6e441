"""The pipeline on a GPU (MLX CUDA or Metal): 2 ranks sharing one device.

Run on a GPU machine with ``python -m pytest tests/gpu``; elsewhere every test
is skipped with the reason. docs/gpu.md records the runs.
"""

import os
import time

import httpx
import mlx.core as mx
import pytest

from ppwrap import PipelineHead

from families import build, cast, greedy_tokens, prompt, write_model_folder, write_model_folders
from launcher import launch, serving

# The fault tests of the CPU suite, collected here again to run on the GPU.
from test_faults import (  # noqa: F401
    folders,
    test_a_stage_dtype_mismatch_fails_on_every_rank_naming_ranks_shapes_and_dtypes,
    test_killed_rank_mid_decode_ends_the_run_non_zero_within_30_seconds_naming_it,
    test_nan_logits_fail_every_rank_on_the_first_step_with_the_likely_causes,
    test_suspended_rank_mid_decode_ends_the_run_non_zero_within_30_seconds,
)

# PPWRAP_GPU_SUITE_ON_CPU=1 runs the suite on the CPU, to check it before a GPU run.
ON_CPU = os.environ.get("PPWRAP_GPU_SUITE_ON_CPU") == "1"
pytestmark = pytest.mark.skipif(
    mx.default_device() != mx.gpu and not ON_CPU,
    reason="no GPU: MLX's default device here is the CPU (run tests/gpu on a CUDA or Metal machine)",
)
DEVICE = "Device(cpu, 0)" if ON_CPU else "Device(gpu, 0)"

TOKENS = 16
PROMPT = "The quick brown"  # what ranks/gpu_generate.py prompts with
CHECKPOINTS = {
    "qwen2-4bit-f16-scales": {"family": "qwen2", "bits": 4, "mix": "f16-scales"},  # tied
    "qwen3_moe-f16-f32-router": {"family": "qwen3_moe", "mix": "f16-f32-router"},
    "deepseek_v3-bf16": {"family": "deepseek_v3", "mix": "bf16-f32-norms"},
    "llama-f16": {"family": "llama", "mix": "f16-f32-norms"},
    "llama-f32": {"family": "llama"},
}
MODES = ["elided", "elided_spin", "elided_sleep", "kept", "overlapped"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("gpu-checkpoints"), CHECKPOINTS)


@pytest.fixture(scope="module")
def reference(checkpoints):
    return greedy_tokens(checkpoints, PROMPT, TOKENS)


@pytest.fixture(scope="module")
def ranks(checkpoints):
    paths = [str(p) for p in checkpoints.values()]
    return launch("gpu_generate.py", 2, str(TOKENS), *paths, timeout=300)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3_moe", "deepseek_v3", "gemma3_text"])
def test_head_decomposition_equals_the_model_on_the_gpu(family):
    model = cast(build(family), "f16-f32-norms")
    x = prompt(model)
    assert mx.array_equal(PipelineHead.wrap(model)(x), model(x))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_greedy_tokens_on_two_gpu_ranks_equal_one_process(ranks, reference, name, mode):
    assert len(reference[name]) == TOKENS
    for r in ranks:
        assert r[name]["device"] == DEVICE
        assert r[name][mode] == reference[name], f"rank {r[name]['rank']}"


def test_ppwrap_generate_on_two_gpu_ranks(tmp_path):
    from test_cli import run

    model = write_model_folder("llama", tmp_path / "llama", mix="f16-f32-norms")
    done = run(
        "generate", "--model", str(model), "--prompt", "The quick", "--max-tokens", "8",
        "--ranks", "2", "--timeout", "200",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Generation: 8 tokens" in done.stdout


def test_ppwrap_serve_on_two_gpu_ranks_answers_a_chat_request(tmp_path):
    model = write_model_folder("qwen2", tmp_path / "qwen2", bits=4, mix="f16-scales")
    body = {
        "model": model.name,
        "messages": [{"role": "user", "content": "The quick brown"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    with serving(model, 2) as server:
        try:
            r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
        except httpx.HTTPError as e:
            raise AssertionError(f"{e!r}; the server's output:\n{server.output()}") from e
        assert r.status_code == 200, (r.text, server.output())
        answer = r.json()
        assert answer["usage"]["completion_tokens"] >= 1
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")


BATCHED = {"llama-f32": {"family": "llama"}, "qwen2-f32": {"family": "qwen2"}}
# What ranks/batch_folders.py decodes.
BATCH_PROMPTS = [[5, 9, 14, 2, 7, 30, 11], [3, 8], [21, 4, 4, 17, 6, 1, 9, 12, 25, 13, 2], [40]]
BATCH_LIMITS = [12, 7, 10, 12]


def test_a_batch_on_two_gpu_ranks_decodes_each_prompt_as_one_process_does_alone(tmp_path):
    from mlx_lm import load as mlx_load
    from mlx_lm import stream_generate as mlx_stream_generate

    batched = write_model_folders(tmp_path, BATCHED)
    ranks = launch("batch_folders.py", 2, *[str(p) for p in batched.values()], timeout=300)
    for name, path in batched.items():
        model, tok = mlx_load(str(path))
        alone = [
            [r.token for r in mlx_stream_generate(model, tok, p, max_tokens=n)]
            for p, n in zip(BATCH_PROMPTS, BATCH_LIMITS, strict=True)
        ]
        for r in ranks:
            assert r[name]["greedy"] == alone, (name, r[name]["rank"])
            assert r[name]["per_step"]["send"] == 1 and r[name]["per_step"]["all_sum"] == 0


def test_ppwrap_serve_on_two_gpu_ranks_batches_concurrent_requests_with_their_answers_alone(
    tmp_path,
):
    from concurrent.futures import ThreadPoolExecutor

    model = write_model_folder("llama", tmp_path / "llama", max_position_embeddings=4096)
    bodies = [
        {"model": model.name, "prompt": [1 + i, 7 + 3 * i, 20 + i], "max_tokens": 6 + i}
        for i in range(6)
    ]
    with serving(model, 2) as server:  # --max-batch 8 by default
        url = server.url + "/v1/completions"
        alone = [httpx.post(url, json=b, timeout=120).json()["choices"][0]["text"] for b in bodies]
        # A long request first: the six join the batch it runs in.
        long = {"model": model.name, "prompt": [5], "max_tokens": 1500}
        with ThreadPoolExecutor(7) as pool:
            holder = pool.submit(httpx.post, url, json=long, timeout=120)
            time.sleep(0.5)
            together = list(pool.map(lambda b: httpx.post(url, json=b, timeout=120), bodies))
            holder.result()
        output = server.output()
    assert [r.json()["choices"][0]["text"] for r in together] == alone, output[-2000:]
    from test_serve import _joins

    assert any(rows > n for n, rows in _joins(output)), output[-2000:]  # joined a running batch


@pytest.mark.parametrize(("family", "n"), [("qwen3_moe", 2), ("qwen2", 3)])
def test_requests_joining_and_leaving_a_batch_on_gpu_ranks_get_mlx_lm_s_tokens_alone(
    tmp_path, family, n
):
    import test_serve

    test_serve.test_requests_joining_and_leaving_a_running_batch_each_get_mlx_lm_s_tokens_for_them_alone(
        tmp_path, family, n
    )


# Families whose stage messages carry more than one hidden state (issue #21):
# carried values, shared keys and values, looped stacks, AltUp streams.
CARRYING = [
    "rwkv7",
    "hunyuan",
    "kimi_k3",
    "nanbeige",
    "iquestloopcoder",
    "gemma4_text",
    "gemma3n",
    "afm7",
    "deepseek_v41",
]


@pytest.fixture(scope="module", params=[2, 3])
def carrying_runs(request):
    return launch(
        "pipeline_families.py", request.param, "4", "ppwrap+f16-f32-norms", *CARRYING, timeout=400
    )


@pytest.mark.parametrize("family", CARRYING)
def test_families_whose_boundaries_carry_more_split_on_gpu_ranks_as_one_process_runs(
    carrying_runs, family
):
    from launcher import family_results

    final, others = family_results(carrying_runs, family)
    assert final["steps_ok"], final
    for r in [final, *others]:
        assert r["tokens_ok"] and r["generated"] == final["mlx_lm_generated"], r
