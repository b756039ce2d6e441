"""talkie: the head is a bare weight array, and a learned scalar gain follows it."""

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import Adapter, register_adapter


def _project(model: nn.Module, hidden: mx.array) -> mx.array:
    return hidden @ model.lm_head.T


def _gain(model: nn.Module, logits: mx.array) -> mx.array:
    return model.lm_head_gain(logits)


register_adapter(
    Adapter(
        model_type="talkie",
        embedding="embed",
        project=_project,
        transform=_gain,
        # The head is the bare array lm_head; ranks that elide it drop it and its gain.
        head_extras=("lm_head", "lm_head_gain"),
        # Blocks are called as block(e_x, h, mask, cache): every block reads the
        # normed input embedding e_x, and the hidden state comes second.
        hidden_arg=1,
        embedding_everywhere=True,
    )
)
