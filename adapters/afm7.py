"""afm7: the KV-reuse layers get the last regular layer's keys and values across stage boundaries."""

import mlx.nn as nn

from ppwrap._adapter import Adapter, SharedKV, register_adapter


def readers(backbone: nn.Module) -> dict[int, int]:
    # Every KV-reuse layer attends with the cache of the last regular layer.
    regular = len(backbone.layers)
    return {regular + i: regular - 1 for i in range(len(backbone.kv_reuse_layers))}


register_adapter(
    Adapter(
        model_type="afm7",
        # One stack in global order: the regular layers, then the KV-reuse ones.
        layers="layers+kv_reuse_layers",
        shared_kv=SharedKV(readers=readers),
        traffic=(
            "the last regular layer's new keys and values, past it and up to the last "
            "KV-reuse layer: 2 x kv_heads x head_dim values"
        ),
    )
)
