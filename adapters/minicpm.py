"""minicpm: an untied head sees the hidden states divided by hidden_size / dim_model_base."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import Adapter, register_adapter


def project(model: nn.Module, hidden: mx.array) -> mx.array:
    args = model.args
    if args.tie_word_embeddings:
        return model.model.embed_tokens.as_linear(hidden)
    # The scaling precedes the matmul, so it cannot be a transform of the logits.
    return model.lm_head(hidden / (args.hidden_size / args.dim_model_base))


register_adapter(Adapter(model_type="minicpm", project=project))
