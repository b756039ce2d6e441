"""ppwrap.load + ppwrap.generate on 2 and 3 ranks, against single-process mlx-lm."""

import pytest

from families import greedy_tokens, write_model_folders
from launcher import launch

TOKENS = 32
PROMPT = "The quick brown"  # what ranks/generate_folders.py prompts with
FOLDERS = {
    "qwen3_moe": {},
    "qwen2": {},  # tied head
    "deepseek_v3": {},
    "llama": {},  # not a PipelineMixin family: split by ppwrap alone
    "qwen2-4bit": {"family": "qwen2", "bits": 4},
    # The dtype mixes of real checkpoints: float32 norms (and router) promote
    # the residual stream, so the stages send float32 hidden states.
    "llama-4bit-f16-scales": {"family": "llama", "bits": 4, "mix": "f16-scales"},
    "qwen2-4bit-f16-scales": {"family": "qwen2", "bits": 4, "mix": "f16-scales"},  # tied
    "llama-bf16": {"family": "llama", "mix": "bf16-f32-norms"},
    "qwen3_moe-f16-f32-router": {"family": "qwen3_moe", "mix": "f16-f32-router"},
}
MIXED = [name for name, spec in FOLDERS.items() if "mix" in spec]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_model_folders(tmp_path_factory.mktemp("checkpoints"), FOLDERS)


@pytest.fixture(scope="module")
def reference(folders):
    return greedy_tokens(folders, PROMPT, TOKENS)


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, folders):
    paths = [str(p) for p in folders.values()]
    return launch("generate_folders.py", request.param, str(TOKENS), *paths, timeout=600)


@pytest.mark.parametrize("name", FOLDERS)
def test_greedy_tokens_on_every_rank_equal_single_process_mlx_lm(ranks, reference, name):
    assert len(reference[name]) == TOKENS
    for r in ranks:
        assert r[name]["greedy"] == reference[name], f"rank {r[name]['rank']}"


@pytest.mark.parametrize("name", MIXED)
def test_mixed_dtype_checkpoints_hold_the_dtypes_they_claim(folders, name):
    import mlx.core as mx

    weights = mx.load(str(folders[name] / "model.safetensors"))
    found = {k: str(v.dtype).removeprefix("mlx.core.") for k, v in weights.items()}
    norms = {d for k, d in found.items() if "norm" in k}
    assert norms == {"float32"}, norms
    half = "bfloat16" if "bf16" in name else "float16"
    assert half in found.values()
    if "scales" in name:
        assert {d for k, d in found.items() if k.endswith((".scales", ".biases"))} == {"float16"}
    if "router" in name:
        routers = {d for k, d in found.items() if k.endswith("mlp.gate.weight")}
        assert routers == {"float32"}


@pytest.mark.parametrize("name", FOLDERS)
def test_a_stop_only_the_final_rank_asks_for_ends_every_rank_on_the_same_step(ranks, name):
    stopped = [r[name]["stopped"] for r in ranks]
    assert all(s == stopped[0] for s in stopped)
    # Asked once 5 tokens were out, while the step of token 5 was already in
    # flight: the flag rides with token 6's broadcast, and 0-5 are yielded.
    assert len(stopped[0]) == 6
    assert stopped[0] == ranks[0][name]["greedy"][: len(stopped[0])]
    # The ranks are still in step: the next generation is the usual one.
    assert all(r[name]["after_stop"] == r[name]["greedy"] for r in ranks)


@pytest.mark.parametrize("name", FOLDERS)
def test_greedy_tokens_are_the_same_whether_waiting_ranks_spin_sleep_or_wake(
    ranks, reference, name
):
    for r in ranks:
        assert r[name]["greedy_spin"] == reference[name], f"rank {r[name]['rank']}"
        assert r[name]["greedy_sleep"] == reference[name], f"rank {r[name]['rank']}"
        assert r[name]["greedy_wake"] == reference[name], f"rank {r[name]['rank']}"
        # Waking ranks waited for every stage message on the ring's sockets
        # (the first stage's first step receives nothing; an end may come early).
        assert r[name]["woken_by_inbox"] >= len(reference[name]) - 1, f"rank {r[name]['rank']}"
    # A stop while the non-final ranks sleep still ends all of them on one step.
    stopped = [r[name]["stopped_sleeping"] for r in ranks]
    assert all(s == stopped[0] for s in stopped)
    assert stopped[0] == ranks[0][name]["stopped"]


@pytest.mark.parametrize("name", FOLDERS)
def test_a_sleeping_rank_waits_for_each_prompt_chunk_in_poll_on_the_ring_sockets(ranks, name):
    for r in ranks:
        mine = r[name]
        # One chunk per prompt token but the last; every rank but the first
        # stage receives each, and a poll of the sockets saw every one come in.
        receives = mine["rank"] != mine["size"] - 1
        assert mine["prompt_chunks"] >= 2
        assert mine["prefill_polled"] == (mine["prompt_chunks"] if receives else 0), mine["rank"]


@pytest.mark.parametrize("name", FOLDERS)
def test_sampled_tokens_agree_on_all_ranks_despite_different_seeds(ranks, name):
    sampled = [r[name]["sampled"] for r in ranks]
    # Sampling may reach the end-of-sequence token early: all ranks stop there.
    assert 1 <= len(sampled[0]) <= TOKENS
    assert all(s == sampled[0] for s in sampled)
    assert sampled[0] != [r[name]["greedy"] for r in ranks][0]  # it did sample


def assert_one_send_and_one_receive_per_token(ranks, name):
    last = len(ranks) - 1
    for r in ranks:
        rank, per_token = r[name]["rank"], r[name]["per_token"]
        # No collective: mlx-lm's end-of-backbone gather and the token
        # broadcast are gone; the token comes round the ring.
        assert per_token["all_gather"] == 0 and per_token["all_sum"] == 0, (rank, per_token)
        assert per_token["send"] == 1, (rank, per_token)  # the final rank: its token
        # The first stage receives the token; the others a stage message.
        assert per_token["recv"] == (1 if rank == last else 0), (rank, per_token)
        assert per_token["recv_like"] == (0 if rank == last else 1), (rank, per_token)


@pytest.mark.parametrize("name", FOLDERS)
def test_each_decoded_token_costs_each_rank_one_send_one_receive_and_no_collective(ranks, name):
    assert_one_send_and_one_receive_per_token(ranks, name)


@pytest.mark.parametrize("name", FOLDERS)
def test_eos_as_the_first_token_and_a_single_token_end_every_rank_in_step(ranks, name):
    eos = ranks[0][name]["eos"]
    for r in ranks:
        assert r[name]["first_eos"] == [[eos, "stop"]], f"rank {r[name]['rank']}"
        assert r[name]["one"] == r[name]["greedy"][:1]
        # Still in step: the next generation is the usual one.
        assert r[name]["after_short"] == r[name]["greedy"]


def test_four_ranks_decode_with_one_send_and_one_receive_per_token(folders, reference):
    ranks = launch("generate_folders.py", 4, f"{TOKENS}:greedy", str(folders["llama"]), timeout=300)
    for r in ranks:
        assert r["llama"]["greedy"] == reference["llama"], f"rank {r['llama']['rank']}"
    assert_one_send_and_one_receive_per_token(ranks, "llama")


def layer_bytes(c, *, qkv_bias):
    """float32 bytes of one llama/qwen2 layer, from the config."""
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * hidden // c["num_attention_heads"]
    attn = 2 * hidden * hidden + 2 * hidden * kv + (hidden + 2 * kv if qkv_bias else 0)
    return 4 * (attn + 3 * hidden * inter + 2 * hidden)


@pytest.mark.parametrize("name,tied,qkv_bias", [("qwen2", True, True), ("llama", False, False)])
def test_resident_bytes_hold_only_local_layers_and_the_head_only_on_rank_0(
    ranks, folders, name, tied, qkv_bias
):
    import json

    c = json.loads((folders[name] / "config.json").read_text())
    layer = layer_bytes(c, qkv_bias=qkv_bias)
    table = 4 * c["vocab_size"] * c["hidden_size"]  # embedding, or untied head
    norm = 4 * c["hidden_size"]
    n = len(ranks)
    split = {2: [2, 2], 3: [2, 1, 1]}[n]
    for r in ranks:
        rank = r[name]["rank"]
        expected = split[rank] * layer + norm
        if rank == n - 1:
            expected += table  # the first stage embeds the prompt
        if rank == 0:
            expected += table  # the final stage: tied embedding or lm_head
        assert r[name]["resident_bytes"] == expected, f"rank {rank}"
