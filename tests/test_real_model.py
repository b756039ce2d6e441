"""SmolLM2-135M-Instruct, converted from its GGUF: ppwrap on 2 and 3 ranks writes
exactly the tokens of single-process mlx-lm, also with float16 scales."""

import shutil

import mlx.core as mx
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate as mlx_stream_generate

from launcher import launch

TOKENS = 32
PROMPT = "The quick brown"  # what ranks/generate_folders.py prompts with


@pytest.fixture(scope="module")
def smollm2_f16_scales(smollm2, tmp_path_factory):
    """SmolLM2 as other converters write it: float16 quantization scales and
    biases, float32 norms. The float32 norms promote the float16 embedding
    output, so the stages exchange float32 hidden states."""
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-f16-scales"
    shutil.copytree(smollm2, folder)
    for path in folder.glob("*.safetensors"):
        weights = mx.load(str(path))
        for key, value in weights.items():
            if key.endswith((".scales", ".biases")):
                weights[key] = value.astype(mx.float16)
        norms = {str(v.dtype) for k, v in weights.items() if "norm" in k}
        assert norms == {"mlx.core.float32"}, norms
        mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})
    return folder


def reference_tokens(folder):
    model, tok = mlx_load(str(folder))
    return [r.token for r in mlx_stream_generate(model, tok, PROMPT, max_tokens=TOKENS)]


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("variant", ["converted", "f16-scales"])
def test_greedy_tokens_of_the_real_model_equal_single_process_mlx_lm(
    smollm2, smollm2_f16_scales, variant, n
):
    folder = smollm2 if variant == "converted" else smollm2_f16_scales
    reference = reference_tokens(folder)
    ranks = launch("generate_folders.py", n, f"{TOKENS}:greedy", str(folder), timeout=600)
    assert len(reference) == TOKENS
    for r in ranks:
        assert r[folder.name]["greedy"] == reference, f"rank {r[folder.name]['rank']}"
