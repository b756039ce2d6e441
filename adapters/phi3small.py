"""phi3small: tied head, logits divided by mup_width_multiplier, dummy token ids masked to -inf."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap import register_adapter


@register_adapter("phi3small")
def mup_and_mask(model: nn.Module, logits: mx.array) -> mx.array:
    if model.mup_width_multiplier:
        logits = logits / model.mup_width_multiplier
    # The Model holds the ids of the tokenizer's unused slots, which never get sampled.
    logits[..., model._dummy_tokenizer_ids] = -float("inf")
    return logits
