"""cohere: tied head, logits scaled by the config's logit_scale."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap import register_adapter


@register_adapter("cohere")
def scale(model: nn.Module, logits: mx.array) -> mx.array:
    return logits * model.model.args.logit_scale
