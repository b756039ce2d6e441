"""rwkv7: every layer reads the first layer's value stream, carried across stage boundaries."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="rwkv7",
        # layer(x, v_first, cache) returns (x, v_first): the first layer's values
        # travel with the hidden state (one more (batch, length, heads, head_dim)).
        carries=(1,),
        traffic="the first layer's values (v_first): heads x head_dim, as many values as the hidden state",
    )
)
