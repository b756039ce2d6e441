"""On one process, PipelineHead runs backbone then head and equals the model."""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from ppwrap import PipelineHead
from ppwrap._adapter import adapter_for
from ppwrap._pipeline import drop_head, empty_weights, nbytes
from ppwrap._support import NEEDS_METAL

from families import CONFIGS, build, installed_families, prompt, reference, variants

FAMILIES = installed_families()
UNSUPPORTED = [f for f in FAMILIES if (a := adapter_for(f)) is not None and a.unsupported]
RUNNABLE = [f for f in FAMILIES if f not in UNSUPPORTED]
HAS_METAL = mx.metal.is_available()
# Each runnable family's config, then the extra ones of families.VARIANTS.
CASES = [pytest.param(f, {}, id=f) for f in RUNNABLE] + [
    pytest.param(f, overrides, id=f"{f}-{name}") for f, name, overrides in variants()
]


def test_every_installed_family_has_a_tiny_config():
    missing = [f for f in FAMILIES if not (CONFIGS / f"{f}.json").exists()]
    assert missing == []


def test_only_olmo_is_unsupported_and_its_reason_is_given():
    assert UNSUPPORTED == ["olmo"]
    assert "ai2-olmo" in adapter_for("olmo").unsupported


@pytest.mark.parametrize("family,overrides", CASES)
def test_wrapped_call_equals_model_call_for_prompt_and_cached_steps(family, overrides):
    if family in NEEDS_METAL and not HAS_METAL:
        pytest.skip(f"not covered on this machine: {NEEDS_METAL[family]}")
    model = reference(family, **overrides)
    head = PipelineHead.wrap(build(family, **overrides))
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


@pytest.mark.parametrize("family", [f for f in RUNNABLE if f not in NEEDS_METAL])
def test_hidden_states_have_the_embedding_width_and_project_to_the_logits(family):
    model = build(family)
    head = PipelineHead.wrap(model)
    x = prompt(model)
    hidden = head.hidden_states(x)
    assert hidden.shape[:2] == x.shape
    assert mx.array_equal(head.project(hidden), model(x)).item()


@pytest.mark.parametrize("family", [f for f in RUNNABLE if f not in NEEDS_METAL])
def test_dropping_the_head_removes_exactly_its_weights_and_projecting_then_fails(family):
    model = build(family)
    head = PipelineHead.wrap(model)
    hidden = head.hidden_states(prompt(model))
    total, head_bytes = nbytes(model), head.head_bytes()
    drop_head(head.parts)
    assert head.head_bytes() == 0
    assert nbytes(model) == total - head_bytes
    if head.parts.tied:
        assert head_bytes == 0  # the embedding stays: the first stage reads it
        # Tied means the projection reads the embedding; nothing else has to go.
        empty_weights(head.parts.embedding)
        with pytest.raises(ValueError):
            mx.eval(head.project(hidden))
    else:
        # An untied head has weights of its own, all of them counted and dropped.
        assert head_bytes > 0
        with pytest.raises(ValueError):
            mx.eval(head.project(hidden))
