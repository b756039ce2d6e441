"""SmolLM2-135M-Instruct, converted from its GGUF: ppwrap on 2 and 3 ranks writes
exactly the tokens of single-process mlx-lm."""

import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate as mlx_stream_generate

from launcher import launch

TOKENS = 32
PROMPT = "The quick brown"  # what ranks/generate_folders.py prompts with


@pytest.fixture(scope="module")
def reference(smollm2):
    model, tok = mlx_load(str(smollm2))
    return [r.token for r in mlx_stream_generate(model, tok, PROMPT, max_tokens=TOKENS)]


@pytest.mark.parametrize("n", [2, 3])
def test_greedy_tokens_of_the_real_model_equal_single_process_mlx_lm(smollm2, reference, n):
    ranks = launch("generate_folders.py", n, f"{TOKENS}:greedy", str(smollm2), timeout=600)
    assert len(reference) == TOKENS
    for r in ranks:
        assert r[smollm2.name]["greedy"] == reference, f"rank {r[smollm2.name]['rank']}"
