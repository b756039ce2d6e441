"""phi3small: tied head, logits divided by mup_width_multiplier, dummy token ids masked to -inf."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import register_adapter


@register_adapter("phi3small")
def mup_and_mask(model: nn.Module, logits: mx.array) -> mx.array:
    if model.mup_width_multiplier:
        logits = logits / model.mup_width_multiplier
    # The Model holds the ids of the tokenizer's unused slots, which never get
    # sampled. They are fixed for the real 100352-entry vocabulary; MLX's scatter
    # does not check bounds, so an id past a smaller vocabulary would write -inf
    # outside the logits (into other arrays) instead of failing: mask only the
    # ids inside it.
    vocab = logits.shape[-1]
    ids = [i for i in model._dummy_tokenizer_ids.tolist() if i < vocab]
    if ids:
        logits[..., mx.array(ids)] = -float("inf")
    return logits
