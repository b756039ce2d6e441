"""deepseek_v41: its residual streams, mixing weights and the compressed keys, index keys and top-k indices later layers read cross stage boundaries."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.deepseek_v41 import (
    _CACHE_FIELDS,
    LayerCache,
    _append,
    _crossing,
    _index_keys,
    _layout,
)

from ppwrap._adapter import Adapter, StageState, register_adapter

# Compressed keys and index keys cross in float32: the receiving rank cannot know
# the dtype the sending one makes them in (the streams' dtype may change on the way).
WIRE = mx.float32


def encode(streams: mx.array) -> mx.array:
    # (batch, length, hc_mult, hidden) -> (batch, length, hc_mult * hidden)
    return streams.reshape(*streams.shape[:2], -1)


def decode(x: mx.array, local: Any) -> mx.array:
    return x.reshape(local.shape)


def _parts(backbone: nn.Module, boundary: int, args: Any, kwargs: Any) -> Any:
    """What crosses ``boundary`` for this call: (key, shape, dtype), after the
    streams and mixing weights (which ppwrap sends as the hidden state and a
    carried value)."""
    batch, length = args[0].shape[:2]
    crossing = _crossing(backbone.args, boundary)
    return crossing, _layout(backbone.args, crossing, batch, length, kwargs["start_pos"], WIRE)[2:]


def layout(backbone: nn.Module, boundary: int, args: Any, kwargs: Any) -> list[Any]:
    return [(shape, dtype) for _, shape, dtype in _parts(backbone, boundary, args, kwargs)[1]]


def give(backbone: nn.Module, boundary: int, args: Any, kwargs: Any) -> list[mx.array]:
    shared = kwargs["shared"]
    arrays = []
    for key, shape, dtype in _parts(backbone, boundary, args, kwargs)[1]:
        part = shared.get(key)
        if part is None:
            part = mx.zeros(shape, dtype)  # not written yet: the layout has no entries either
        elif key in _CACHE_FIELDS:
            part = part[:, part.shape[1] - shape[1] :]  # only the new entries
        elif key == "candidates":
            part = part[..., :: backbone.args.candidate_block_size]  # one flag per block
        arrays.append(part.astype(dtype))
    return arrays


def take(backbone: nn.Module, boundary: int, args: Any, kwargs: Any, arrays: list[mx.array]) -> Any:
    a = backbone.args
    cache, shared = kwargs["cache"], kwargs["shared"]
    end = kwargs["start_pos"] + args[0].shape[1]
    crossing, parts = _parts(backbone, boundary, args, kwargs)
    for (key, _, _), part in zip(parts, arrays, strict=True):
        if key in _CACHE_FIELDS:
            # This rank's first layer never writes the field (it would be a source
            # itself, read instead): its cache keeps the source's entries.
            if part.shape[1]:
                setattr(cache, key, _append(getattr(cache, key), part))
            shared[key] = getattr(cache, key)
        elif key == "candidates":
            keys = _index_keys(a, crossing[key], end)
            mask = mx.repeat(part, a.candidate_block_size, axis=-1)
            shared[key] = mask[..., :keys] if keys else None
        else:
            shared[key] = part
    return args, kwargs


def advance(cache: Any, length: int, batch: int) -> bool:
    if not isinstance(cache, LayerCache):
        return False
    # The window's rows and the offset move as on a real layer: the backbone
    # indexes every layer's window from the first layer's.
    cache.update_window(mx.zeros((batch, length, 0)))
    cache.window = mx.zeros(cache.window.shape, cache.window.dtype)  # no growing graph
    return True


register_adapter(
    Adapter(
        model_type="deepseek_v41",
        # layer(streams, pre_mix, *, start_pos, window_idx, cache, shared) returns
        # (streams, pre_mix); `shared` holds what later layers read.
        hidden_codec=(encode, decode),
        carries=(1,),
        state=StageState(layout=layout, give=give, take=take),
        advance=advance,
        traffic=(
            "the hc_mult residual streams (hc_mult hidden states), their mixing weights, "
            "and what later layers read: new compressed keys and index keys (a row per "
            "compress ratio tokens), top-k indices and candidate flags"
        ),
    )
)
