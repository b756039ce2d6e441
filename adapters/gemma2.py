"""gemma2: tied head, then tanh soft-capping of the logits."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap import register_adapter


@register_adapter("gemma2")
def softcap(model: nn.Module, logits: mx.array) -> mx.array:
    cap = model.final_logit_softcapping
    return mx.tanh(logits / cap) * cap
