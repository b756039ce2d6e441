"""rwkv7: generic parts; ppwrap.pipeline cannot split it."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="rwkv7",
        unsplittable=(
            "every layer reads the value stream of the first layer (v_first), which only the first stage computes."
        ),
    )
)
