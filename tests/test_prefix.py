"""The prompt-prefix cache: longest stored prefix, copies that leave the stored
entry as it was, least recently used out under the byte bound."""

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache, KVCache

from ppwrap.serve.prefix import PrefixCache, bytes_per_token, reusable

HEADS, DIM = 2, 4


def filled(tokens, layers=2):
    cache = [KVCache() for _ in range(layers)]
    for c in cache:
        x = mx.array(tokens, mx.float32).reshape(1, 1, -1, 1) * mx.ones((1, HEADS, 1, DIM))
        c.update_and_fetch(x, x)
    return cache


def test_the_longest_stored_prefix_is_taken_as_a_copy_cut_back_to_it():
    store = PrefixCache(10**6, per_token=64)
    store.put([1, 2, 3, 4, 5], filled([1, 2, 3, 4, 5]))
    store.put([1, 2, 9], filled([1, 2, 9]))
    cache, n = store.take([1, 2, 3, 4, 7, 8])
    assert n == 4 and [c.offset for c in cache] == [4, 4]
    keys, _ = cache[0].state[:2]
    assert keys[0, 0, :4, 0].tolist() == [1, 2, 3, 4]
    cache[0].update_and_fetch(*(mx.zeros((1, HEADS, 2, DIM)),) * 2)  # the copy moves on
    again, n = store.take([1, 2, 3, 4, 5, 6])
    assert n == 5 and again[0].state[0][0, 0, :5, 0].tolist() == [1, 2, 3, 4, 5]


def test_the_last_prompt_token_is_always_computed():
    store = PrefixCache(10**6, per_token=64)
    store.put([1, 2, 3], filled([1, 2, 3]))
    assert store.take([1, 2, 3])[1] == 2
    assert store.take([7, 8]) == (None, 0)


def test_put_keeps_only_the_tokens_the_cache_holds_and_evicts_under_the_bound():
    store = PrefixCache(max_bytes=10 * 64, per_token=64)
    store.put([1, 2, 3, 4, 5, 6], filled([1, 2, 3, 4]))  # the cache holds 4 of them
    assert store.match([1, 2, 3, 4, 5, 6, 7]) == ((1, 2, 3, 4), 4)
    store.put([9, 9, 9, 9, 9], filled([9, 9, 9, 9, 9]))
    store.take([1, 2, 3, 8])  # used: the 9s are now the oldest
    store.put([7, 7, 7], filled([7, 7, 7]))
    assert store.nbytes <= store.max_bytes
    assert store.match([9, 9, 9, 9, 9, 1])[1] == 0 and store.match([1, 2, 3, 4, 0])[1] == 4
    store.put(list(range(11)), filled(list(range(11))))  # over the bound alone: not kept
    assert store.match(list(range(12)))[1] == 0


def test_recurrent_caches_are_not_reusable_and_bytes_per_token_count_filled_layers():
    assert reusable(filled([1, 2])) and not reusable([ArraysCache(1)])
    assert bytes_per_token(filled([1, 2, 3]) + [KVCache()]) == 2 * 2 * HEADS * DIM * 4
