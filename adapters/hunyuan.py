"""hunyuan: cross-layer attention's shared keys and values cross stage boundaries."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="hunyuan",
        # layer(h, mask, cache, shared_kv_states) returns (h, shared_kv_states): the
        # new positions' keys and values of a sharing group's first layer. Carrying
        # them (2 * kv_heads * head_dim per token) lets a split fall inside a group;
        # the backbone starts each group with None, which a receiving layer keeps.
        carries=(3,),
        traffic="the new keys and values of the cross-layer-attention group (2 x kv_heads x head_dim values)",
    )
)
