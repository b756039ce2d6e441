"""On one process, PipelineHead runs backbone then head and equals the model."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from ppwrap import PipelineHead
from families import CONFIGS, build, installed_families, prompt

FAMILIES = installed_families()


def test_every_installed_family_has_a_tiny_config():
    missing = [f for f in FAMILIES if not (CONFIGS / f"{f}.json").exists()]
    assert missing == []


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapped_call_equals_model_call_for_prompt_and_cached_steps(family):
    if not (CONFIGS / f"{family}.json").exists():
        pytest.fail(f"no tiny config for {family}")
    model = build(family)
    head = PipelineHead.wrap(model)
    assert head.size == 1 and head.rank == 0 and head.is_final

    x = prompt(model)
    assert mx.array_equal(head(x), model(x)).item()

    # A prompt then two decode steps through a KV cache, one cache per path.
    cache_ref, cache_head = make_prompt_cache(model), make_prompt_cache(head)
    assert len(cache_head) == len(cache_ref)
    for step in (x, x[:, -1:], x[:, :1]):
        ref = model(step, cache=cache_ref)
        out = head(step, cache=cache_head)
        assert out.shape == ref.shape
        assert mx.array_equal(out, ref).item(), f"{family}: logits differ"
