"""qwen3_5: after shard(), lm_head computes a vocabulary slice per rank; the slices are gathered."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import register_adapter


@register_adapter("qwen3_5")
def gather_vocab(model: nn.Module, logits: mx.array) -> mx.array:
    group: mx.distributed.Group | None = model.sharding_group
    if group is None:
        return logits
    n, size = group.size(), logits.shape[-1]
    parts = mx.distributed.all_gather(logits.reshape(-1, size), group=group)
    # all_gather stacks the ranks' rows; put each row's slices side by side.
    parts = parts.reshape(n, -1, size).transpose(1, 0, 2)
    return parts.reshape(*logits.shape[:-1], n * size)
