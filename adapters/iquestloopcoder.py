"""iquestloopcoder: its two loops over the layers go round the ranks; each layer's second loop reads its first loop's keys and values on the same rank."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from ppwrap._adapter import Adapter, register_adapter


def layer_call(
    layer: nn.Module,
    h: mx.array,
    mask: Any,
    cache: Any,
    *,
    loop: int,
    window_mask: Any,
    gate: nn.Module,
    kv: dict[int, tuple[mx.array, mx.array]],
) -> mx.array:
    """One layer of one loop, as the backbone runs it inline.

    The first loop attends over the full cache and keeps its keys and values;
    the second mixes attention over those with attention over a window of its
    own keys and values (its cache), weighted by a learned gate.
    """
    attn = layer.self_attn
    batch, length, _ = h.shape
    offset = cache.offset if cache is not None else 0
    q, k, v = attn.get_qkv(layer.input_layernorm(h), offset)
    if cache is not None:
        k, v = cache.update_and_fetch(k, v)
    if loop == 0:
        kv[id(layer)] = (k, v)
        out = attn.attention(q, k, v, mask, cache=cache)
    else:
        k1, v1 = kv.pop(id(layer))
        g = gate(q)
        out = g * attn.attention(q, k1, v1, mask, cache=cache) + (1 - g) * attn.attention(
            q, k, v, window_mask, cache=cache
        )
    h = h + attn.o_proj(out.transpose(0, 2, 1, 3).reshape(batch, length, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def call_backbone(
    backbone: nn.Module, inputs: mx.array, cache: Any = None, **kwargs: Any
) -> mx.array:
    h = backbone.embed_tokens(inputs)
    n = len(backbone.layers)
    cache = cache if cache is not None else [None] * (2 * n)
    mask = create_attention_mask(h, cache[0])
    window_mask = create_attention_mask(h, cache[n], window_size=backbone.loop_window_size)
    kv: dict[int, tuple[mx.array, mx.array]] = {}
    for loop in (0, 1):
        for i, layer in enumerate(backbone.layers):
            gate = backbone.gate_projections[i]
            c = cache[loop * n + i]
            h = layer(h, mask, c, loop=loop, window_mask=window_mask, gate=gate, kv=kv)
    return backbone.norm(h)


register_adapter(
    Adapter(
        model_type="iquestloopcoder",
        layer_call=layer_call,
        call_backbone=call_backbone,
        loops="loop_num",
        traffic=(
            "the hidden state again in the second loop (2 messages per boundary), and "
            "once from the final rank to the first stage between loops"
        ),
    )
)
