"""ppwrap.batch_generate_step: several prompts decoded as one batch through the
pipeline, on 1, 2 and 3 ranks, each sequence as single-process mlx-lm decodes it alone."""

import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate as mlx_stream_generate

from families import write_model_folders
from launcher import launch

# qwen2: a tied head; hunyuan: boundaries carry shared keys and values (its
# groups of 2 layers split on 3 ranks); nanbeige: its layers run twice per token.
FOLDERS = {"qwen2": {}, "qwen3_moe": {}, "llama": {}, "hunyuan": {}, "nanbeige": {}}
LOOPS = {"nanbeige": 2}
# What ranks/batch_folders.py decodes.
PROMPTS = [[5, 9, 14, 2, 7, 30, 11], [3, 8], [21, 4, 4, 17, 6, 1, 9, 12, 25, 13, 2], [40]]
LIMITS = [12, 7, 10, 12]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("checkpoints"), FOLDERS)


@pytest.fixture(scope="module")
def reference(folders):
    """Single-process mlx-lm's greedy tokens, each prompt alone."""
    found = {}
    for name, path in folders.items():
        model, tok = mlx_load(str(path))
        found[name] = [
            [r.token for r in mlx_stream_generate(model, tok, p, max_tokens=n)]
            for p, n in zip(PROMPTS, LIMITS, strict=True)
        ]
    return found


@pytest.fixture(scope="module", params=[1, 2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, folders):
    paths = [str(p) for p in folders.values()]
    return launch("batch_folders.py", request.param, *paths, timeout=600)


@pytest.mark.parametrize("name", FOLDERS)
def test_each_sequence_of_a_batch_gets_single_process_mlx_lm_tokens_for_its_prompt_alone(
    ranks, reference, name
):
    for r in ranks:
        got = r[name]["greedy"]
        assert [len(t) for t in got] == LIMITS
        assert got == reference[name], f"rank {r[name]['rank']}"
        # Ranks that sleep until each message is due (wait="wake") get the same.
        assert r[name]["waking"] == reference[name], f"rank {r[name]['rank']}"


@pytest.mark.parametrize("name", FOLDERS)
def test_a_stop_from_the_final_rank_ends_only_its_sequence_in_step_on_every_rank(
    ranks, reference, name
):
    final = next(r[name] for r in ranks if r[name]["rank"] == 0)["stopped"]
    # Asked once 3 tokens are out; the final rank samples one step ahead.
    assert len(final[1]) in (3, 4) and final[1] == reference[name][1][: len(final[1])]
    assert final[0] == reference[name][0][:10] and final[2] == reference[name][2][:10]
    for r in ranks:
        assert r[name]["stopped"] == final


@pytest.mark.parametrize("name", FOLDERS)
def test_a_seeded_sequence_samples_the_same_tokens_alone_and_in_a_batch(ranks, name):
    final = next(r[name] for r in ranks if r[name]["rank"] == 0)
    assert final["sampled"][2] == final["alone"]
    assert len(set(map(tuple, final["sampled"]))) > 1  # the seeds differ per sequence
    for r in ranks:
        assert r[name]["sampled"] == final["sampled"]


@pytest.mark.parametrize("name", FOLDERS)
def test_a_batched_decode_step_is_one_send_and_one_receive_per_rank(ranks, name):
    for r in ranks:
        steps = r[name]["per_step"]
        assert steps["all_sum"] == steps["all_gather"] == 0
        if len(ranks) > 1:
            # Once round per loop: a looped stack's final rank also hands the first
            # stage the next loop's input.
            loops = LOOPS.get(name, 1)
            assert steps["send"] == loops and steps["recv"] + steps["recv_like"] == loops, steps
