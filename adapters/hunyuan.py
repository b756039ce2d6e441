"""hunyuan: generic parts; ppwrap.pipeline cannot split it."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="hunyuan",
        unsplittable=(
            "cross-layer attention shares keys and values between neighbouring layers, which may sit on different ranks."
        ),
    )
)
