"""ppwrap.pipeline splits every family it can: 2 and 3 ranks over the ring backend.

One launch per rank count checks them all (see ``ranks/pipeline_families.py``).
The families it cannot split say why, and pipeline() raises that reason.
"""

import pytest

from ppwrap import UnsplittableModelError, pipeline
from ppwrap._adapter import Adapter, adapter_for
from ppwrap._support import NEEDS_METAL

from families import CPU_FLOAT32_ONLY, FakeGroup, build, installed_families, variants
from launcher import family_results, launch

STEPS = 8
GENERATE = 3  # tokens per greedy generation, as in ranks/pipeline_families.py


def _why_not(family):
    adapter = adapter_for(family)
    return adapter and (adapter.unsupported or adapter.unsplittable)


UNSPLITTABLE = [f for f in installed_families() if f not in NEEDS_METAL and _why_not(f)]
FAMILIES = [f for f in installed_families() if f not in NEEDS_METAL and not _why_not(f)]
# Looped stacks' other configs run here too (FAMILY@VARIANT): the single-process
# split tests cannot run them (the first stage waits for the final one mid-pass).
FAMILIES += [f"{f}@{name}" for f, name, _ in variants() if getattr(adapter_for(f), "loops", None)]


# 2 ranks with one dtype everywhere; 3 ranks with real checkpoints' mix:
# float16 weights, float32 norms, so stages send float32 hidden states.
RUNS = {"2ranks-float32": (2, ""), "3ranks-f16-f32-norms": (3, "f16-f32-norms")}


@pytest.fixture(scope="module", params=list(RUNS))
def ranks(request):
    n, mix = RUNS[request.param]
    splitter = f"ppwrap+{mix}" if mix else "ppwrap"
    return launch("pipeline_families.py", n, str(STEPS), splitter, *FAMILIES, timeout=900)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_dtype_run_casts_every_family_it_can(ranks, family):
    final, _ = family_results(ranks, family)
    if len(ranks) == 3:
        expected = "" if family in CPU_FLOAT32_ONLY else "f16-f32-norms"
        assert final["mix"] == expected
    else:
        assert final["mix"] == ""


@pytest.mark.parametrize("family", FAMILIES)
def test_ppwrap_split_matches_unsharded_for_prompt_chunked_prefill_and_decode(ranks, family):
    final, others = family_results(ranks, family)
    assert final["steps_ok"], final
    assert all(r["tokens_ok"] for r in [final, *others])


@pytest.mark.parametrize("family", FAMILIES)
def test_ppwrap_greedy_generation_matches_single_process_mlx_lm(ranks, family):
    final, others = family_results(ranks, family)
    expected = final["mlx_lm_generated"]
    assert len(expected) == GENERATE  # no EOS: the run makes all its tokens
    for r in [final, *others]:
        assert r["generated"] == expected, f"rank {r['rank']}"


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_entries_of_layers_on_other_ranks_hold_no_bytes(ranks, family):
    final, others = family_results(ranks, family)
    for r in [final, *others]:
        assert r["shadow_cache_bytes"] == 0, r
        # Some other rank's layers have entries here (afm7's first stage has them
        # all: its KV-reuse layers keep none).
        assert r["shadow_caches"] >= 1 or r["own_caches"] == r["cache_entries"], r
        # The count sees real entries: the rank's own ones hold the prompt.
        assert r["own_cache_bytes"] > 0 or r["own_caches"] == 0, r


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decoded_token_crosses_each_boundary_in_one_message_per_loop(ranks, family):
    final, others = family_results(ranks, family)
    adapter = adapter_for(family.partition("@")[0]) or Adapter(model_type=family)
    loops = final["loops"]
    base = family.partition("@")[0]
    expected = 3 if family == "nanbeige@3-loops-one-norm" else 2 if adapter.loops else 1
    assert loops == expected, base
    extra = []  # bytes per message beyond the hidden state
    for r in [final, *others]:
        first = r["rank"] == len(ranks) - 1
        # A looped stack's final rank also hands the first stage each next loop's input.
        assert len(r["decode_sends"]) == (loops - 1 if r["is_final"] else loops), r
        assert len(r["decode_receives"]) == (loops - 1 if first else loops), r
        extra += [sent - r["hidden_bytes"] for sent in r["decode_sends"]]
    if adapter.carries:  # what the layers hand on, at every boundary
        assert all(e > 0 for e in extra), extra
    elif adapter.shared_kv:  # shared keys and values, where a reader is past it
        assert all(e >= 0 for e in extra) and any(e > 0 for e in extra), extra
    else:  # the hidden state alone: one (1, 1, hidden) array
        assert all(e == 0 for e in extra), extra


def test_every_family_that_runs_here_splits():
    # olmo cannot run here at all (its module needs torch); bitnet and muse_spark
    # need Metal. Everything else splits: nothing is refused.
    assert UNSPLITTABLE == ["olmo"]


def test_an_adapter_that_refuses_to_split_raises_unsplittable_model_error_with_its_reason():
    refusing = Adapter(model_type="llama", unsplittable="its layers do something else")
    with pytest.raises(UnsplittableModelError, match="cannot split model type") as raised:
        pipeline(build("llama"), FakeGroup(), handshake=False, adapter=refusing)
    assert "its layers do something else" in str(raised.value)
    assert isinstance(raised.value, ValueError)  # what callers caught before


def test_both_stream_choices_give_the_same_logits():
    # The CPU stream is what ppwrap picks on a CUDA GPU; here both run on the CPU.
    default = launch("pipeline_families.py", 2, "4", "ppwrap", "qwen3", "llama", timeout=300)
    cpu = launch("pipeline_families.py", 2, "4", "ppwrap-cpu", "qwen3", "llama", timeout=300)
    for family in ("qwen3", "llama"):
        assert default[0][family]["tokens"] == cpu[0][family]["tokens"]
        assert default[0][family]["max_diff"] == cpu[0][family]["max_diff"]
