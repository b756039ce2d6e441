"""nanochat: untied lm_head on a ``transformer`` backbone, then tanh soft-capping at 15."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import register_adapter

# nanochat hard-codes the cap in its forward pass; no config key carries it.
SOFTCAP = 15.0


@register_adapter("nanochat")
def softcap(model: nn.Module, logits: mx.array) -> mx.array:
    return SOFTCAP * mx.tanh(logits / SOFTCAP)
