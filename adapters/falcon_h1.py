"""falcon_h1: a tied head's logits are scaled by lm_head_multiplier / embedding_multiplier."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import register_adapter


@register_adapter("falcon_h1")
def scale(model: nn.Module, logits: mx.array) -> mx.array:
    args = model.args
    # An untied lm_head has the multiplier folded into its weights by sanitize.
    if not args.tie_word_embeddings:
        return logits
    return logits * (args.lm_head_multiplier / args.embedding_multiplier)
