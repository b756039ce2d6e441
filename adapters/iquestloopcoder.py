"""iquestloopcoder: generic parts; ppwrap.pipeline cannot split it."""

from ppwrap._adapter import Adapter, register_adapter

register_adapter(
    Adapter(
        model_type="iquestloopcoder",
        unsplittable=(
            "it runs its layer stack twice per token (two loops), so no contiguous slice of layers is a stage."
        ),
    )
)
