"""ppwrap.pipeline in one process, with a fake group: who owns which layer and weight."""

import mlx.core as mx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from ppwrap import PipelineHead, StageMismatchError, pipeline
from ppwrap._adapter import adapter_for
from ppwrap._pipeline import Wire, check_split, even_split, layer_list, link

from families import VARIANTS, FakeGroup, build, reference, variants, vocab_size


def nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


@given(layers=st.integers(1, 200), size=st.integers(1, 16))
def test_even_split_covers_every_layer_once_with_extra_layers_on_low_ranks(layers, size):
    if size > layers:
        with pytest.raises(ValueError, match="at least one layer"):
            even_split(layers, size)
        return
    split = even_split(layers, size)
    assert sum(split) == layers and len(split) == size
    assert max(split) - min(split) <= 1
    assert split == sorted(split, reverse=True)


@given(split=st.lists(st.integers(-2, 6), min_size=1, max_size=6), extra=st.integers(-1, 1))
def test_check_split_accepts_exactly_positive_splits_summing_to_the_layer_count(split, extra):
    layers = sum(split) + extra
    valid = extra == 0 and all(s > 0 for s in split)
    if valid:
        assert check_split(split, layers, len(split)) == split
    else:
        with pytest.raises(ValueError, match="split"):
            check_split(split, layers, len(split))


def test_check_split_names_the_rank_count_when_lengths_differ():
    with pytest.raises(ValueError, match="has 2 entries but the group has 3 ranks"):
        check_split([2, 2], 4, 3)


@pytest.mark.parametrize("rank,owned", [(0, [2, 3]), (1, [0, 1])])
def test_rank_keeps_weights_of_its_own_layers_only(rank, owned):
    model = build("llama")  # 4 layers, untied head
    sizes = [nbytes(layer) for layer in model.layers]
    stage = pipeline(model, FakeGroup(rank, 2), handshake=False)
    assert (stage.start, stage.end) == (owned[0], owned[-1] + 1)
    for i, layer in enumerate(layer_list(PipelineHead.wrap(model).parts)):
        assert nbytes(layer) == (sizes[i] if i in owned else 0), i


def test_uneven_split_puts_the_first_layers_on_the_last_rank():
    model = build("llama")
    stages = [
        pipeline(build("llama"), FakeGroup(r, 3), split=[1, 2, 1], handshake=False)
        for r in range(3)
    ]
    assert [(s.start, s.end) for s in stages] == [(3, 4), (1, 3), (0, 1)]
    del model


def test_non_first_rank_holds_no_input_embedding_unless_its_tied_head_needs_it():
    untied = build("llama")
    pipeline(untied, FakeGroup(0, 2), handshake=False)
    assert nbytes(untied.model.embed_tokens) == 0
    assert nbytes(untied.lm_head) > 0

    tied = build("qwen2")  # tied head: the final rank projects with the embedding
    pipeline(tied, FakeGroup(0, 2), handshake=False)
    assert nbytes(tied.model.embed_tokens) == 128 * 32 * 4

    first = build("qwen2")
    pipeline(first, FakeGroup(1, 2), handshake=False)
    assert nbytes(first.model.embed_tokens) == 128 * 32 * 4


def test_embedding_of_a_receiving_rank_still_gives_the_right_shape_and_dtype():
    model = build("llama")
    pipeline(model, FakeGroup(0, 2), handshake=False)
    out = model.model.embed_tokens(mx.array([[1, 2, 3]]))
    assert out.shape == (1, 3, 32) and out.dtype == mx.float32


def test_pipelining_twice_is_an_error():
    model = build("llama")
    pipeline(model, FakeGroup(0, 2), handshake=False)
    with pytest.raises(ValueError, match="already pipelined"):
        pipeline(model, FakeGroup(0, 2), handshake=False)


def test_more_ranks_than_layers_is_an_error_naming_both():
    with pytest.raises(ValueError, match="cannot split 4 layers over 5 ranks"):
        pipeline(build("llama"), FakeGroup(0, 5))


def test_head_reports_rank_and_size_of_the_ppwrap_stage():
    model = build("llama")
    pipeline(model, FakeGroup(1, 3), handshake=False)
    head = PipelineHead.wrap(model)
    assert (head.rank, head.size, head.is_final, head.returns_logits) == (1, 3, False, False)


def test_a_middle_rank_keeps_a_tied_embedding_when_every_rank_runs_the_head():
    elided, kept = build("qwen2"), build("qwen2")
    pipeline(elided, FakeGroup(1, 3), handshake=False)
    pipeline(kept, FakeGroup(1, 3), handshake=False, head_on_every_rank=True)
    assert nbytes(elided.model.embed_tokens) == 0
    assert nbytes(kept.model.embed_tokens) == 128 * 32 * 4


def record(out=None, width=(32,), **table):
    """A stage record as ranks exchange them at the handshake."""
    if out is not None:
        return {"out": [list(width), out]}
    return {"in": list(width), "table": {k: [list(width), v] for k, v in table.items()}}


def test_link_gives_every_rank_what_the_previous_stage_really_sends():
    records = [
        record(float16="float16", float32="float32"),  # rank 0: keeps its input's dtype
        record(float16="float32", bfloat16="float32", float32="float32"),  # float32 norms
        record(out="bfloat16"),  # rank 2, the first stage, sends bfloat16
    ]
    wires = [(w.receives, w.sends) for w in link(records)]
    assert wires[2] == (None, Wire((32,), "bfloat16"))
    assert wires[1] == (Wire((32,), "bfloat16"), Wire((32,), "float32"))
    assert wires[0] == (Wire((32,), "float32"), None)


def test_link_refuses_a_dtype_or_width_the_next_stage_cannot_take():
    with pytest.raises(StageMismatchError, match=r"rank 1 sends its hidden state as float32 "):
        link([record(float16="float16"), record(out="float32")])
    with pytest.raises(StageMismatchError, match=r"rank 0 takes \(batch, length, 64\)"):
        link([record(width=(64,), float32="float32"), record(out="float32")])


def mixed(model):
    """float16 weights, float32 norms: a real checkpoint's mix."""
    from families import cast

    return cast(model, "f16-f32-norms")


@pytest.mark.parametrize("family", ["llama", "qwen3_moe", "gemma3_text"])
def test_a_receiving_rank_receives_what_the_layers_before_it_produce(family):
    # float32 norms promote the float16 residual stream, except where a family
    # casts back (gemma3_text keeps its input's dtype).
    reference = mixed(build(family))
    model = mixed(build(family))
    layers = layer_list(PipelineHead.wrap(model).parts)
    first = len(layers) - len(layers) // 2
    expected = str(probe_dtype(reference, first)).removeprefix("mlx.core.")
    embedded = model_embedding_dtype(model)
    stage = pipeline(model, FakeGroup(0, 2), handshake=False)
    assert stage.receives == Wire((32,), expected)
    # The embedding's stand-in keeps its own dtype: backbones derive values
    # from it before the first layer (ministral3's attention scale).
    assert model_embedding_dtype(model) == embedded == "float16"


def probe_dtype(model, upto):
    """The dtype of the hidden state after the first ``upto`` layers, run for real."""
    parts = PipelineHead.wrap(model).parts
    layers = layer_list(parts)
    seen = []
    layer = layers[upto - 1]
    cls = type(layer)

    def call(self, *args, **kwargs):
        out = cls.__call__(self, *args, **kwargs)
        seen.append(out.dtype)
        return out

    layer.__class__ = type(cls.__name__, (cls,), {"__call__": call})
    mx.eval(parts.run_backbone(mx.array([[1, 2]])))
    layer.__class__ = cls
    return seen[0]


def model_embedding_dtype(model):
    embedding = PipelineHead.wrap(model).parts.embedding
    return str(embedding(mx.array([[1]])).dtype).removeprefix("mlx.core.")


def test_a_layer_that_changes_dtype_after_the_split_fails_before_anything_is_sent():
    model = build("llama")
    pipeline(model, FakeGroup(1, 2), handshake=False)  # sends float32
    model.set_dtype(mx.float16)
    with pytest.raises(StageMismatchError, match="would send its hidden state as float16"):
        PipelineHead.wrap(model)(mx.array([[1, 2]]))


# ------------------------------------------- every rank in this one process


@pytest.fixture
def loopback(monkeypatch):
    """Stage messages between ranks that all run in this process, in pipeline order.

    What a rank sends, the next rank receives: the ranks must run first stage
    first, each evaluating its output before the next one runs.
    """
    queue: list[mx.array] = []

    def send(x, dst, *, group=None, stream=None):
        queue.append(x)
        return x

    def recv_like(like, src, *, group=None, stream=None):
        x = queue.pop(0)
        assert (x.shape, x.dtype) == (like.shape, like.dtype), "a stage received another wire"
        return x

    monkeypatch.setattr(mx.distributed, "send", send)
    monkeypatch.setattr(mx.distributed, "recv_like", recv_like)
    return queue


class Ranks:
    """Every rank of a pipeline of ``family`` (with ``loopback``), one cache each."""

    def __init__(self, family, size, **overrides):
        self.heads = []
        for rank in range(size):
            model = build(family, **overrides)
            pipeline(model, FakeGroup(rank, size), handshake=False)
            self.heads.append(PipelineHead.wrap(model))
        self.caches = [head.make_cache() for head in self.heads]

    def __call__(self, inputs, *, cached):
        """The final rank's logits, after the ranks before it ran their stages."""
        for head, cache in reversed(list(zip(self.heads, self.caches, strict=True))):
            out = head(inputs, cache=cache if cached else None)
            mx.eval(out)
        return out


def close(a, b):
    # Masked logits are -inf in both (phi3small); compare the finite rest.
    a, b = (mx.where(mx.isinf(t), -1e9, t) for t in (a, b))
    return mx.allclose(a, b, atol=1e-4, rtol=1e-4).item()


# The base config of each family in families.VARIANTS, then its variants.
# Not the looped stacks: their first stage waits for the final one mid-pass, which
# ranks run one after another cannot do (test_pipeline_any launches those).
SPLIT_CASES = [
    pytest.param(f, {}, id=f) for f in VARIANTS if not getattr(adapter_for(f), "loops", None)
] + [
    pytest.param(f, overrides, id=f"{f}-{name}")
    for f, name, overrides in variants()
    if not getattr(adapter_for(f), "loops", None)
]
PREFILL_CHUNK = 4  # prompts of 7 tokens prefill in two chunks: 4, then 3
DECODE_STEPS = 8


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("family,overrides", SPLIT_CASES)
def test_final_rank_matches_the_unsplit_model_for_prompt_chunked_prefill_and_decode(
    family, overrides, size, loopback
):
    unsplit = reference(family, **overrides)
    ranks = Ranks(family, size, **overrides)
    vocab = min(vocab_size(unsplit), 100)
    x = mx.random.randint(0, vocab, (2, 4), key=mx.random.key(1))
    assert close(ranks(x, cached=False), unsplit(x)), "prompt without a cache"

    x = mx.random.randint(0, vocab, (2, 7), key=mx.random.key(2))
    cache = make_prompt_cache(unsplit)
    for chunk in (x[:, :PREFILL_CHUNK], x[:, PREFILL_CHUNK:]):
        out, ref = ranks(chunk, cached=True), unsplit(chunk, cache=cache)
        assert close(out, ref), f"prefill chunk of {chunk.shape[1]} tokens"
    for step in range(DECODE_STEPS):
        token = mx.argmax(ref[:, -1:], axis=-1)
        out, ref = ranks(token, cached=True), unsplit(token, cache=cache)
        assert close(out, ref), f"decode step {step}"
    assert loopback == []  # every message sent was received


@given(
    costs=st.lists(st.integers(1, 50), min_size=2, max_size=9),
    head=st.integers(0, 200),
    size=st.integers(2, 3),
)
def test_balanced_split_finds_the_least_largest_stage_with_the_head_on_rank_0(costs, head, size):
    from itertools import combinations

    from ppwrap._pipeline import balanced_split

    if size > len(costs):
        return
    split = balanced_split(costs, head, size)
    assert len(split) == size and sum(split) == len(costs) and min(split) >= 1

    def largest(per_rank):
        # Rank size-1 holds the first layers, rank 0 the last ones and the head.
        stages, at = [], 0
        for n in reversed(per_rank):
            stages.append(sum(costs[at : at + n]))
            at += n
        stages[-1] += head
        return max(stages)

    best = min(
        largest([b - a for a, b in zip((0, *cuts), (*cuts, len(costs)), strict=True)][::-1])
        for cuts in combinations(range(1, len(costs)), size - 1)
    )
    assert largest(split) == best


def test_auto_split_gives_the_final_rank_fewer_layers_when_its_head_is_large():
    # Vocabulary 1000 x hidden 32: the head reads about as much as 3 of the 4 layers.
    model = build("llama", vocab_size=1000)
    assert pipeline(model, FakeGroup(0, 2), split="auto", handshake=False).split == (1, 3)
    assert pipeline(build("llama"), FakeGroup(0, 2), split="even", handshake=False).split == (2, 2)


def test_an_unknown_split_word_is_refused():
    with pytest.raises(ValueError, match="'even', 'auto' or layers per rank"):
        pipeline(build("llama"), FakeGroup(0, 2), split="balanced", handshake=False)


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: tied head
def test_a_stage_timed_alone_sends_and_receives_nothing(monkeypatch, family, rank):
    model = build(family)
    pipeline(model, FakeGroup(rank, 2), handshake=False)
    head = PipelineHead.wrap(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a stage timed alone talked to a peer")

    for name in ("send", "recv", "recv_like", "all_sum", "all_gather"):
        monkeypatch.setattr(mx.distributed, name, refuse)
    seconds = head.stage_seconds(rows=2, steps=3)
    assert 0 < seconds < 5


def test_auto_split_balances_multiply_adds_on_the_cpu_and_bytes_on_a_gpu():
    import mlx.nn as nn

    from ppwrap._adapter import resolve
    from ppwrap._pipeline import auto_split, layer_list, multiply_adds

    # 8 layers of hidden 32 (4-bit) and a 1000 x 32 head (8-bit), as quantized
    # checkpoints keep their embedding and head at 8 bits.
    model = build("llama", vocab_size=1000, num_hidden_layers=8)
    nn.quantize(
        model,
        group_size=32,
        class_predicate=lambda p, m: (
            hasattr(m, "to_quantized") and {"bits": 8 if p == "lm_head" else 4, "group_size": 32}
        ),
    )
    assert multiply_adds(model.lm_head) == 1000 * 32
    assert multiply_adds(model.model.layers[0].mlp) == 3 * 32 * 64
    parts = resolve(model)
    layers = layer_list(parts)
    # Per token the head does about 3.3 layers' multiply-adds but reads as much
    # as about 6 layers: by bytes it gets a rank of its own and one layer.
    assert auto_split(parts, layers, 2, by="flops") == [2, 6]
    assert auto_split(parts, layers, 2, by="bytes") == [1, 7]


def test_a_packed_stage_message_gives_back_arrays_of_every_dtype_and_odd_size():
    from ppwrap import _carry as carry

    arrays = [
        mx.arange(3, dtype=mx.float16).reshape(1, 1, 3) / 7,
        mx.array([[[True, False, True, True, False]]]),
        mx.arange(6, dtype=mx.int32).reshape(1, 2, 3) - 2,
        mx.arange(5, dtype=mx.bfloat16).reshape(1, 1, 5) / 3,
        mx.arange(7, dtype=mx.float32).reshape(1, 7) / 9,
    ]
    parts = [(tuple(a.shape), a.dtype) for a in arrays]
    message = carry.pack(arrays)
    assert message.shape == carry.packed_zeros(parts).shape
    assert message.shape[0] % carry.ALIGN == 0
    for got, want in zip(carry.unpack(message, parts), arrays, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert mx.array_equal(got, want)
