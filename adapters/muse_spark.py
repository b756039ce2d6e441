"""muse_spark: backbone at model.language_model; logits cast to fp32, scaled by output_multiplier, tanh soft-capped."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import register_adapter


@register_adapter("muse_spark", backbone="model.language_model")
def scale_and_softcap(model: nn.Module, logits: mx.array) -> mx.array:
    text = model.args.text
    logits = logits.astype(mx.float32) * text.output_multiplier
    cap: float = text.final_logit_softcapping
    return mx.tanh(logits / cap) * cap
