"""afm7: generic parts; ppwrap.pipeline cannot split it."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="afm7",
        unsplittable=(
            "its KV-reuse layers attend with the keys and values of earlier layers, which another rank would hold."
        ),
    )
)
