"""phixtral: backbone at transformer takes (x, mask, cache) and leaves the causal mask to its caller."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import Adapter, register_adapter


def call_backbone(
    backbone: nn.Module, inputs: mx.array, cache: Any = None, **kwargs: Any
) -> mx.array:
    # What mlx-lm's mask helper gives for a KV cache (or none): causal unless one token.
    mask = "causal" if inputs.shape[1] > 1 else None
    return backbone(inputs, mask, cache, **kwargs)


register_adapter(
    Adapter(
        model_type="phixtral",
        backbone="transformer",
        embedding="embd",
        call_backbone=call_backbone,
    )
)
