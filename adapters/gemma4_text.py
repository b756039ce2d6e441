"""gemma4_text: layers that reuse earlier layers' keys and values get them across stage boundaries; logits tanh soft-capped by final_logit_softcapping (when set)."""

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from ppwrap._adapter import Adapter, SharedKV, register_adapter
from ppwrap.transforms import softcap


def readers(backbone: nn.Module) -> dict[int, int]:
    # previous_kvs[j] is j for a layer with its own keys and values, else the
    # last earlier layer of its type (sliding or full attention).
    return {j: i for j, i in enumerate(backbone.previous_kvs) if i != j}


def returns(hidden: mx.array, kv: Any, offset: Any) -> Any:
    # Every layer returns (h, (keys, values), offset); readers take a source's
    # keys, values and the offset its queries were rotated by.
    if kv is None:
        return hidden, None, None
    return hidden, kv, mx.array(offset) if offset is not None else 0


SHARED = SharedKV(readers=readers, returns=returns, new_kv=lambda out: out[1])


def per_layer_inputs(backbone: nn.Module) -> bool:
    # The per-layer inputs are projected from the input embedding.
    return bool(getattr(backbone, "hidden_size_per_layer_input", 0))


register_adapter(
    Adapter(
        model_type="gemma4_text",
        shared_kv=SHARED,
        embedding_everywhere=per_layer_inputs,
        transform=softcap("final_logit_softcapping"),
        traffic=(
            "the new keys and values of each source layer (the last of each attention "
            "type before the KV-shared layers) read after the boundary: "
            "2 x kv_heads x head_dim values each"
        ),
    )
)
