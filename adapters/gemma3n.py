"""gemma3n: KV-shared layers get their source's keys and values across stage boundaries; the language model applies its tied head and soft-capping after its final norm."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import Adapter, SharedKV, register_adapter, stop_after
from ppwrap.transforms import softcap


def readers(language_model: nn.Module) -> dict[int, int]:
    # Layers from first_kv_shared_layer_idx on attend with the cache of the last
    # earlier layer of their type (sliding or full).
    first = language_model.first_kv_shared_layer_idx
    return {i: c for i, c in enumerate(language_model.layer_idx_to_cache_idx) if i >= first}


def encode(h: mx.array) -> mx.array:
    # The AltUp streams are stacked first: (streams, batch, length, hidden).
    streams, batch, length, hidden = h.shape
    return mx.moveaxis(h, 0, 2).reshape(batch, length, streams * hidden)


def decode(x: mx.array, local: Any) -> mx.array:
    streams, batch, length, hidden = local.shape
    return mx.moveaxis(x.reshape(batch, length, streams, hidden), 2, 0)


register_adapter(
    Adapter(
        model_type="gemma3n",
        text_model="model.language_model",
        # The language model is its own backbone: stop it once its norm returns.
        backbone="",
        call_backbone=stop_after("norm"),
        transform=softcap("final_logit_softcapping"),
        hidden_codec=(encode, decode),
        shared_kv=SharedKV(readers=readers),
        # The per-layer inputs are projected from the input embedding.
        embedding_everywhere=True,
        traffic=(
            "the AltUp streams (altup_num_inputs hidden states in all), and the new keys "
            "and values of each KV source layer read after the boundary: "
            "2 x kv_heads x head_dim values each"
        ),
    )
)
